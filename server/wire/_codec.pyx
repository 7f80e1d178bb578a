# cython: language_level=3
"""Record codec: warehouse rows -> pre-encoded protobuf, and replies built from it.

A stored record is the body of a ``google.protobuf.Struct`` (its map entries,
one per column, in column order) behind a small index, so that a read mask
becomes a handful of slices instead of a decode and re-encode:

    uint32 person_id | uint16 n | uint32 end[n] | entry[0] ... entry[n-1]

``end[i]`` is the offset, from the first entry, just past entry ``i``. All
integers are little-endian. Replies are assembled from these bytes by
concatenation, which is valid protobuf because a message is the concatenation
of its encoded fields.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from libc.stdio cimport snprintf
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject

# Column kinds; the numbers are qualify.v1.ValueType's.
DEF K_STRING = 1
DEF K_INT = 2
DEF K_FLOAT = 3
DEF K_BOOL = 4
DEF K_TIMESTAMP = 5

DEF HEADER_ID = 4


cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.len + extra
    cdef char* grown
    if need <= b.cap:
        return 0
    while b.cap < need:
        b.cap *= 2
    grown = <char*>realloc(b.data, b.cap)
    if grown == NULL:
        raise MemoryError()
    b.data = grown
    return 0


cdef inline int varint_size(uint64_t v) nogil:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline Py_ssize_t put_varint(char* p, uint64_t v) nogil:
    cdef Py_ssize_t n = 0
    while v >= 0x80:
        p[n] = <char>((v & 0x7F) | 0x80)
        v >>= 7
        n += 1
    p[n] = <char>v
    return n + 1


cdef inline void civil_from_days(int64_t z, int64_t* y, int* m, int* d) nogil:
    # Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
    z += 719468
    cdef int64_t era = floordiv(z, 146097)
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    d[0] = <int>(doy - (153 * mp + 2) // 5 + 1)
    m[0] = <int>(mp + 3 if mp < 10 else mp - 9)
    y[0] = yoe + era * 400 + (1 if m[0] <= 2 else 0)


cdef inline int64_t floordiv(int64_t a, int64_t b) nogil:
    # cdivision truncates toward zero; times before 1970 need floor division.
    cdef int64_t q = a / b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef int format_rfc3339(int64_t micros, char* out) nogil:
    """Writes e.g. 2024-05-01T12:34:56Z or ...56.250000Z; returns the length."""
    cdef int64_t secs = floordiv(micros, 1000000)
    cdef int64_t frac = micros - secs * 1000000
    cdef int64_t days = floordiv(secs, 86400)
    cdef int64_t sod = secs - days * 86400
    cdef int64_t y
    cdef int m, d
    civil_from_days(days, &y, &m, &d)
    if frac:
        return snprintf(out, 40, "%04lld-%02d-%02dT%02d:%02d:%02d.%06lldZ", <long long>y, m, d,
                        <int>(sod // 3600), <int>((sod // 60) % 60), <int>(sod % 60), <long long>frac)
    return snprintf(out, 40, "%04lld-%02d-%02dT%02d:%02d:%02dZ", <long long>y, m, d,
                    <int>(sod // 3600), <int>((sod // 60) % 60), <int>(sod % 60))


def rfc3339(int64_t micros):
    """Formats microseconds since the epoch as RFC 3339 (UTC)."""
    cdef char out[48]
    cdef int n = format_rfc3339(micros, out)
    return out[:n].decode("ascii")


cdef int put_entry(Buf* b, bytes key_part, int kind, const char* sval, Py_ssize_t slen,
                   double dval, int bval) except -1:
    """Appends one Struct map entry: {key: Value}."""
    cdef Py_ssize_t vlen
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(key_part)
    cdef Py_ssize_t inner
    if kind == 0:            # null_value = NULL_VALUE
        vlen = 2
    elif kind == K_STRING:   # string_value
        vlen = 1 + varint_size(slen) + slen
    elif kind == K_FLOAT:    # number_value
        vlen = 9
    else:                    # bool_value
        vlen = 2
    inner = klen + varint_size(vlen) + vlen
    buf_reserve(b, 1 + varint_size(inner) + inner)
    cdef char* p = b.data + b.len
    p[0] = 0x0A
    p += 1
    p += put_varint(p, inner)
    memcpy(p, PyBytes_AS_STRING(key_part), klen)
    p += klen
    p += put_varint(p, vlen)
    if kind == 0:
        p[0] = 0x08
        p[1] = 0
        p += 2
    elif kind == K_STRING:
        p[0] = 0x1A
        p += 1
        p += put_varint(p, slen)
        memcpy(p, sval, slen)
        p += slen
    elif kind == K_FLOAT:
        p[0] = 0x11
        memcpy(p + 1, &dval, 8)   # little-endian hosts only (x86-64, aarch64)
        p += 9
    else:
        p[0] = 0x20
        p[1] = 1 if bval else 0
        p += 2
    b.len = p - b.data
    return 0


def key_part(str name):
    """The constant prefix of a column's map entry: key field, then value tag."""
    cdef bytes k = name.encode("utf-8")
    cdef Py_ssize_t n = len(k)
    cdef char tmp[10]
    cdef Py_ssize_t w = put_varint(tmp, n)
    return b"\x0a" + tmp[:w] + k + b"\x12"


def encode_records(list key_parts, list kinds, list columns, list valids, Py_ssize_t nrows):
    """Encodes ``nrows`` rows into stored records (without the person id).

    ``kinds[i]`` is a ValueType number; ``columns[i]`` is, by kind: a sequence
    of str (STRING), an int64 array (INT, TIMESTAMP in microseconds), a float64
    array (FLOAT) or a uint8 array (BOOL). ``valids[i]`` is a uint8 array, 0
    where the value is NULL. Returns one bytes object per row.
    """
    cdef Py_ssize_t ncols = len(kinds)
    cdef Py_ssize_t r, c, slen, body_start
    cdef int kind
    cdef const char* s
    cdef char ts[48]
    cdef Buf b
    cdef list out = [None] * nrows
    cdef uint32_t end
    cdef const uint8_t[::1] mv_u8
    cdef const int64_t[::1] mv_i64
    cdef const double[::1] mv_f64
    if ncols > 0xFFFF:
        raise ValueError("too many columns")
    # Raw pointers into each column, taken once per batch: re-acquiring a typed
    # view per cell cost more than the encoding itself. ``keep`` holds the
    # arrays the pointers point into for the duration of the loop.
    cdef list keep = []
    cdef int* kind_of = <int*>malloc(max(ncols, 1) * sizeof(int))
    cdef const uint8_t** valid_of = <const uint8_t**>malloc(max(ncols, 1) * sizeof(void*))
    cdef const void** data_of = <const void**>malloc(max(ncols, 1) * sizeof(void*))
    cdef PyObject** objs_of = <PyObject**>malloc(max(ncols, 1) * sizeof(void*))
    if kind_of == NULL or valid_of == NULL or data_of == NULL or objs_of == NULL:
        free(kind_of); free(valid_of); free(data_of); free(objs_of)
        raise MemoryError()
    b.cap = 1024
    b.data = <char*>malloc(b.cap)
    try:
        if b.data == NULL:
            raise MemoryError()
        for c in range(ncols):
            kind = kinds[c]
            kind_of[c] = kind
            mv_u8 = valids[c]
            keep.append(mv_u8)
            valid_of[c] = &mv_u8[0] if mv_u8.shape[0] else NULL
            data_of[c] = NULL
            objs_of[c] = NULL
            if kind == K_STRING:
                col = list(columns[c]) if not isinstance(columns[c], list) else columns[c]
                keep.append(col)
                objs_of[c] = <PyObject*>col
            elif kind == K_INT or kind == K_TIMESTAMP:
                mv_i64 = columns[c]
                keep.append(mv_i64)
                data_of[c] = &mv_i64[0] if mv_i64.shape[0] else NULL
            elif kind == K_FLOAT:
                mv_f64 = columns[c]
                keep.append(mv_f64)
                data_of[c] = &mv_f64[0] if mv_f64.shape[0] else NULL
            elif kind == K_BOOL:
                mv_u8 = columns[c]
                keep.append(mv_u8)
                data_of[c] = &mv_u8[0] if mv_u8.shape[0] else NULL
            else:
                raise ValueError(f"unknown column kind {kind}")
        for r in range(nrows):
            b.len = 0
            buf_reserve(&b, 2 + 4 * ncols)
            (<uint16_t*>b.data)[0] = <uint16_t>ncols
            b.len = 2 + 4 * ncols
            body_start = b.len
            for c in range(ncols):
                kind = kind_of[c]
                if not valid_of[c][r]:
                    put_entry(&b, <bytes>key_parts[c], 0, NULL, 0, 0.0, 0)
                elif kind == K_STRING:
                    s = PyUnicode_AsUTF8AndSize(<object>PyList_GET_ITEM(<object>objs_of[c], r), &slen)
                    put_entry(&b, <bytes>key_parts[c], K_STRING, s, slen, 0.0, 0)
                elif kind == K_INT:
                    put_entry(&b, <bytes>key_parts[c], K_FLOAT, NULL, 0, <double>(<const int64_t*>data_of[c])[r], 0)
                elif kind == K_FLOAT:
                    put_entry(&b, <bytes>key_parts[c], K_FLOAT, NULL, 0, (<const double*>data_of[c])[r], 0)
                elif kind == K_BOOL:
                    put_entry(&b, <bytes>key_parts[c], K_BOOL, NULL, 0, 0.0, (<const uint8_t*>data_of[c])[r])
                else:  # K_TIMESTAMP
                    slen = format_rfc3339((<const int64_t*>data_of[c])[r], ts)
                    put_entry(&b, <bytes>key_parts[c], K_STRING, ts, slen, 0.0, 0)
                end = <uint32_t>(b.len - body_start)
                memcpy(b.data + 2 + 4 * c, &end, 4)
            out[r] = PyBytes_FromStringAndSize(b.data, b.len)
    finally:
        free(b.data)
        free(kind_of)
        free(valid_of)
        free(data_of)
        free(objs_of)
    return out


def length_delimited(bytes tag, bytes payload):
    """One length-delimited field: tag byte(s), varint length, payload."""
    cdef char tmp[10]
    cdef Py_ssize_t w = put_varint(tmp, PyBytes_GET_SIZE(payload))
    return tag + tmp[:w] + payload


cdef inline void entry_span(const uint8_t* stored, Py_ssize_t c, uint32_t* e0, uint32_t* e1) noexcept nogil:
    """Where entry ``c`` starts and ends, relative to the first entry."""
    memcpy(e1, &stored[HEADER_ID + 2 + 4 * c], 4)
    e0[0] = 0
    if c > 0:
        memcpy(e0, &stored[HEADER_ID + 2 + 4 * (c - 1)], 4)


def record_message(bytes prefix, bytes key, const uint8_t[::1] stored, tuple mask, bytes memberships):
    """Builds a ``qualify.v1.Record`` from a stored record.

    ``prefix`` is the encoded ``collection`` field; ``key`` the UTF-8 key;
    ``mask`` the column indices to keep (None keeps all); ``memberships`` the
    already encoded ``memberships`` fields.
    """
    cdef Py_ssize_t n = stored[HEADER_ID] | (stored[HEADER_ID + 1] << 8)
    cdef Py_ssize_t body = HEADER_ID + 2 + 4 * n
    cdef Py_ssize_t total = stored.shape[0]
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(key)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(prefix)
    cdef Py_ssize_t mlen = PyBytes_GET_SIZE(memberships)
    cdef Py_ssize_t flen = 0, i, c, start, stop, size
    cdef uint32_t e0, e1
    if body > total:
        raise ValueError("corrupt stored record")
    if mask is None:
        flen = total - body
    else:
        for i in range(len(mask)):
            c = mask[i]
            if c < n:
                entry_span(&stored[0], c, &e0, &e1)
                flen += e1 - e0
    size = plen + 1 + varint_size(klen) + klen + 1 + varint_size(flen) + flen + mlen
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(prefix), plen)
    p += plen
    p[0] = 0x12
    p += 1
    p += put_varint(p, klen)
    memcpy(p, PyBytes_AS_STRING(key), klen)
    p += klen
    p[0] = 0x1A
    p += 1
    p += put_varint(p, flen)
    if mask is None:
        if flen:
            memcpy(p, &stored[body], flen)
        p += flen
    else:
        for i in range(len(mask)):
            c = mask[i]
            if c < n:
                entry_span(&stored[0], c, &e0, &e1)
                memcpy(p, &stored[body + e0], e1 - e0)
                p += e1 - e0
    memcpy(p, PyBytes_AS_STRING(memberships), mlen)
    return out


# -- decoding, for readers in the caller's process (qualify.clients.LocalReader) ---------
#
# The writer produced every stored byte, but a reader maps a file that another
# process (possibly another Qualify version, or a torn copy) wrote: every
# length is checked against the record's end, and anything unexpected raises
# ValueError rather than yielding a wrong value.

cdef inline Py_ssize_t get_varint(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint64_t* out) except -1:
    cdef uint64_t v = 0
    cdef int shift = 0
    while pos < end and shift < 64:
        v |= (<uint64_t>(p[pos] & 0x7F)) << shift
        if not (p[pos] & 0x80):
            out[0] = v
            return pos + 1
        pos += 1
        shift += 7
    raise ValueError("corrupt stored record: truncated varint")


cdef object decode_value(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end):
    """One google.protobuf.Value of the kinds encode_records writes."""
    cdef uint64_t n
    cdef double d
    if pos >= end:
        return None  # an empty Value: kind unset, which Struct readers treat as null
    cdef uint8_t tag = p[pos]
    if tag == 0x08:    # null_value
        return None
    if tag == 0x1A:    # string_value
        pos = get_varint(p, pos + 1, end, &n)
        if pos + <Py_ssize_t>n > end:
            raise ValueError("corrupt stored record: string past the entry")
        return (<const char*>p + pos)[:n].decode("utf-8")
    if tag == 0x11:    # number_value
        if pos + 9 > end:
            raise ValueError("corrupt stored record: number past the entry")
        memcpy(&d, p + pos + 1, 8)
        return d
    if tag == 0x20:    # bool_value
        get_varint(p, pos + 1, end, &n)
        return n != 0
    raise ValueError(f"corrupt stored record: unexpected Value tag {tag:#x}")


cdef int decode_entry(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, dict out) except -1:
    """One Struct map entry (0x0A len {0x0A key, 0x12 Value}) into ``out``."""
    cdef uint64_t n, klen, vlen
    if pos >= end or p[pos] != 0x0A:
        raise ValueError("corrupt stored record: not a map entry")
    pos = get_varint(p, pos + 1, end, &n)
    if pos + <Py_ssize_t>n != end:
        raise ValueError("corrupt stored record: entry length")
    if pos >= end or p[pos] != 0x0A:
        raise ValueError("corrupt stored record: entry without a key")
    pos = get_varint(p, pos + 1, end, &klen)
    if pos + <Py_ssize_t>klen > end:
        raise ValueError("corrupt stored record: key past the entry")
    key = (<const char*>p + pos)[:klen].decode("utf-8")
    pos += klen
    if pos < end:
        if p[pos] != 0x12:
            raise ValueError("corrupt stored record: entry without a value")
        pos = get_varint(p, pos + 1, end, &vlen)
        if pos + <Py_ssize_t>vlen != end:
            raise ValueError("corrupt stored record: value length")
        out[key] = decode_value(p, pos, end)
    else:
        out[key] = None
    return 0


def decode_fields(const uint8_t[::1] stored, tuple mask):
    """A stored record's fields as {name: Python value}, as a Struct reader sees them.

    Values are what ``google.protobuf.Struct`` carries: str, float (an INT
    column reads 42.0), bool, None; timestamps are their RFC 3339 strings.
    ``mask`` is column indices to keep (None keeps all), as for record_message.
    Raises ValueError on bytes that are not a record this codec wrote.
    """
    cdef Py_ssize_t total = stored.shape[0]
    if total < HEADER_ID + 2:
        raise ValueError("corrupt stored record: shorter than its header")
    cdef const uint8_t* p = &stored[0]
    cdef Py_ssize_t n = p[HEADER_ID] | (p[HEADER_ID + 1] << 8)
    cdef Py_ssize_t body = HEADER_ID + 2 + 4 * n
    cdef Py_ssize_t i, c, prev = 0
    cdef uint32_t e0, e1
    cdef dict out = {}
    if body > total:
        raise ValueError("corrupt stored record: index past the record")
    if mask is None:
        for c in range(n):
            entry_span(p, c, &e0, &e1)
            if e0 != prev or e1 < e0 or body + e1 > total:
                raise ValueError("corrupt stored record: entry index")
            decode_entry(p, body + e0, body + e1, out)
            prev = e1
        if body + prev != total:
            raise ValueError("corrupt stored record: bytes after the last entry")
    else:
        for i in range(len(mask)):
            c = mask[i]
            if c < n:
                entry_span(p, c, &e0, &e1)
                if e1 < e0 or body + e1 > total:
                    raise ValueError("corrupt stored record: entry index")
                decode_entry(p, body + e0, body + e1, out)
    return out


def decode_memberships(const uint8_t[::1] raw, tuple audience_ids):
    """[(audience id, enter_us)] of a stored membership, in bit order.

    The layout is storage/realtime.py's: u16 n | bitset (n bytes) | i64 enter
    time per set bit. Bits the catalog does not name (freed, or past its end)
    are skipped, as PersonalizeService.Get skips them.
    """
    cdef Py_ssize_t size = raw.shape[0]
    cdef list out = []
    if size == 0:
        return out
    if size < 2:
        raise ValueError("corrupt stored membership")
    cdef const uint8_t* p = &raw[0]
    cdef Py_ssize_t n = p[0] | (p[1] << 8)
    cdef Py_ssize_t nids = len(audience_ids)
    cdef Py_ssize_t i, b, bit, k = 0
    cdef int64_t enter
    if 2 + n > size:
        raise ValueError("corrupt stored membership")
    for i in range(n):
        if not p[2 + i]:
            continue
        for b in range(8):
            if p[2 + i] >> b & 1:
                if 2 + n + 8 * (k + 1) > size:
                    raise ValueError("corrupt stored membership: fewer times than bits")
                bit = i * 8 + b
                if bit < nids:
                    aid = audience_ids[bit]
                    if aid:
                        memcpy(&enter, p + 2 + n + 8 * k, 8)
                        out.append((aid, enter))
                k += 1
    return out
