"""The wire form of records: rows encoded once at sync time, replies assembled by slicing."""

from ._codec import (decode_fields, decode_memberships, encode_records, key_part, length_delimited, record_message,
                     rfc3339)

__all__ = ["decode_fields", "decode_memberships", "encode_records", "key_part", "length_delimited", "record_message", "rfc3339"]
