"""``qualify keys create|list|revoke``: API keys in the project's data directory.

The server needs no restart and no signal: every serving process notices
the changed key file within a fraction of a second (see keys.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .keys import SCOPES, KeyCommandError, KeyFile, keys_path


def _data_dir(args) -> Path:
    """The project's data_dir (--project, else ./qualify.toml), else the embedded demo's --data-dir."""
    from ..config import load_project

    path = args.project or ("qualify.toml" if Path("qualify.toml").is_file() else None)
    if path is not None:
        return load_project(path).data_dir
    return Path(args.data_dir).resolve()


def _limits(key) -> str:
    out = ""
    if key.collections is not None:
        out += f"  collections {','.join(sorted(key.collections))}"
    if key.fields is not None:
        out += f"  fields {','.join(sorted(key.fields))}"
    return out


def cmd_keys(args) -> int:
    keys = KeyFile(keys_path(_data_dir(args)))
    try:
        if args.keys_command == "create":
            key, token = keys.create(args.name, args.scope, args.collection, args.fields)
            if args.json:
                print(json.dumps({**key.to_json(), "key": token}, indent=2))
            else:
                print(f"{token}\t{key.id}")  # `cut -f1` for the key alone
                print(f"created {key.id} ({key.name or 'no name'}) with scopes {', '.join(sorted(key.scopes))}"
                      f"{_limits(key)}; the key above is shown once: Qualify keeps only its hash", file=sys.stderr)
        elif args.keys_command == "list":
            listed = keys.read()
            if args.json:
                print(json.dumps([k.to_json() for k in listed], indent=2))
            elif not listed:
                print(f"no API keys in {keys.path} yet: `qualify keys create` makes one", file=sys.stderr)
            else:
                for k in listed:
                    state = f"revoked {k.revoked}" if k.revoked else "valid"
                    print(f"{k.id}  {k.name or '-':20}  {','.join(sorted(k.scopes)):40}  created {k.created}  {state}"
                          f"{_limits(k)}")
        else:
            key = keys.revoke(args.key_id)
            print(f"{key.id} revoked at {key.revoked}")
    except KeyCommandError as exc:
        print(f"qualify keys: {exc}", file=sys.stderr)
        return 2 if args.keys_command == "revoke" else 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys",
                       description="API keys, stored hashed in DATA_DIR/keys.json; changes take effect in a "
                                   "running server within a second. Scopes: " + ", ".join(SCOPES) + ".")
    p.add_argument("--project", help="the project file (default ./qualify.toml, else the embedded demo)")
    p.add_argument("--data-dir", default="qualify-data", help="the embedded demo's data folder (default ./qualify-data)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    c = keys_sub.add_parser("create", help="make a key and print it (once)")
    c.add_argument("--name", default="", help="what the key is for, e.g. checkout-service")
    c.add_argument("--scope", action="append", required=True, metavar="SCOPE",
                   help="repeat or separate with commas: " + ", ".join(SCOPES))
    c.add_argument("--collection", action="append", metavar="NAME",
                   help="read only these collections (repeat or separate with commas; default: all)")
    c.add_argument("--fields", action="append", metavar="FIELD",
                   help="read only these fields, e.g. plan,recommended_sku (default: all); for a key a browser holds")
    c.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    ls = keys_sub.add_parser("list", help="every key's id, name, scopes and state (never the key)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    r = keys_sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    p.set_defaults(func=cmd_keys)
