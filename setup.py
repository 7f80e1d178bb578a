"""Build script: generates the gRPC modules from proto/ and compiles Cython.

The source folders map onto one import namespace, ``qualify``:

    proto/qualify/v1 -> qualify.v1          (generated *_pb2 modules land here)
    server/          -> qualify.server
    evaluator_ext/   -> qualify.evaluator   (the compiled hot path)
    clients/         -> qualify.clients
    bench/           -> qualify.bench

Set QUALIFY_DEBUG=1 to build the extensions with Cython annotations (HTML next
to each .pyx) and line tracing for profilers.
"""

import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.build_py import build_py as _build_py

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"
DEBUG = os.environ.get("QUALIFY_DEBUG", "") not in ("", "0")

PACKAGE_DIR = {
    "qualify.v1": "proto/qualify/v1",
    "qualify.server": "server",
    "qualify.evaluator": "evaluator_ext",
    "qualify.clients": "clients",
    "qualify.bench": "bench",
}


def _packages() -> list[str]:
    """Every package under PACKAGE_DIR: each mapped folder and its subfolders with an __init__.py.

    Derived, not listed: a new subpackage (server/delivery, ...) ships without
    anyone remembering to add it here. Editable installs never showed the gap.
    """
    out = []
    for name, folder in PACKAGE_DIR.items():
        out.append(name)
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / folder).parts
            if parts and "__pycache__" not in parts:
                out.append(".".join((name, *parts)))
    return out


PACKAGES = _packages()


def generate_protos():
    """Runs protoc over proto/qualify/v1 into the same folder (never edited)."""
    from grpc_tools import protoc  # build requirement, see pyproject.toml
    import grpc_tools

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "qualify" / "v1").glob("*.proto"))
    well_known = str(pathlib.Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={PROTO_ROOT}",
        f"--pyi_out={PROTO_ROOT}",
        f"--grpc_python_out={PROTO_ROOT}",
        *sources,
    ]
    cwd = os.getcwd()
    os.chdir(PROTO_ROOT)  # protoc resolves the relative sources against -I
    try:
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + " ".join(sources))
    finally:
        os.chdir(cwd)


# The demo page's analytics.js (Segment's analytics-next, its UMD build and the
# chunks it loads), pinned and taken from the npm registry at build time, so a
# running server never fetches it from a CDN.
ANALYTICS_NEXT = "@segment/analytics-next@1.84.3"
VENDOR = ROOT / "server" / "transport" / "http" / "static" / "vendor"


def vendor_analytics():
    """Unpacks ANALYTICS_NEXT's dist/umd/*.js into VENDOR (once); without npm, warns and goes on."""
    if (VENDOR / "index.js").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        print("warning: npm not found: /demo will serve no analytics.js (apt-get install npm)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", ANALYTICS_NEXT, "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True)
        packed = sorted(pathlib.Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not packed:
            print(f"warning: npm pack {ANALYTICS_NEXT} failed: {done.stderr.strip()[:400]}")
            return
        VENDOR.mkdir(parents=True, exist_ok=True)
        with tarfile.open(packed[0]) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("package/")
                if member.isfile() and (name.upper().startswith("LICENSE") or (name.startswith("dist/umd/") and name.endswith(".js"))):
                    (VENDOR / pathlib.PurePosixPath(name).name).write_bytes(tar.extractfile(member).read())


class build_py(_build_py):
    def run(self):
        generate_protos()
        vendor_analytics()
        super().run()


class build_ext(_build_ext):
    def finalize_options(self):
        from Cython.Build import cythonize

        directives = {
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        }
        if DEBUG:
            directives.update(linetrace=True, profile=True, boundscheck=True)
        self.distribution.ext_modules = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=DEBUG,
            quiet=True,
        )
        super().finalize_options()

    def run(self):
        generate_protos()  # editable installs may run build_ext before build_py
        vendor_analytics()
        super().run()


macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
extra = ["-O0", "-g"] if DEBUG else ["-O3"]

setup(
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    package_data={"qualify.v1": ["*.proto", "*.pyi"], "qualify.evaluator": ["*.pyi"], "qualify.server.wire": ["*.pyi"], "qualify.clients": ["py.typed"],
                  "qualify.bench": ["*.toml"],
                  "qualify.server.transport.http": ["static/*.html", "static/vendor/*.js", "static/vendor/LICENSE*"]},
    # Cython's annotation pages stay out; the demo page's HTML goes in.
    exclude_package_data={"": ["*.c", "*.pyx"], "qualify.evaluator": ["*.html"], "qualify.server.wire": ["*.html"]},
    ext_modules=[
        Extension("qualify.evaluator._evaluator", ["evaluator_ext/_evaluator.pyx"], define_macros=macros, extra_compile_args=extra),
        Extension("qualify.server.wire._codec", ["server/wire/_codec.pyx"], define_macros=macros, extra_compile_args=extra),
    ],
    cmdclass={"build_py": build_py, "build_ext": build_ext},
)
