# Sequence and absence leaves: the value keys of their `same` properties (included by _evaluator.pyx).

# ---------------------------------------------------------------- value keys
#
# One entry per same property, in the leaf's order: 1 bool (u8), 2 str (uv len, UTF-8),
# 3 an integral number in int64 (zz), 4 any other float (f64), 5 an integral number
# beyond int64 (uv len, its decimal digits). 1 == 1.0 and 10**20 == 1e20 encode alike,
# as predicates compare them; NaN never equals anything, so it is missing.

cdef Py_ssize_t _q_key(CompiledEvaluator ev, dict props, tuple names, Py_ssize_t q) except -2:
    """Writes the event's value key at ev.kbuf + q; its end, or -1 when a value is missing."""
    cdef Py_ssize_t n
    cdef PyObject* pv
    cdef object v
    cdef bytes b
    cdef double x
    cdef uint8_t tag
    for name in names:
        pv = PyDict_GetItem(props, name)
        if pv == NULL or <object>pv is None:
            return -1
        v = <object>pv
        b = None
        if type(v) is bool:
            tag = 1
        elif isinstance(v, str):
            tag = 2
            b = (<str>v).encode("utf-8", "surrogatepass")
        elif _is_number(v):
            if isinstance(v, float):
                x = float(v)
                if isnan(x):
                    return -1  # NaN equals nothing, itself included
                if isfinite(x) and x == floor(x):
                    v = int(x)  # integral: equal to the int of the same value, as == says
            if isinstance(v, int):
                if INT64_MIN <= v <= INT64_MAX:
                    tag = 3
                else:
                    tag = 5
                    b = str(v).encode()
            else:
                tag = 4
        else:
            return -1
        n = 11 + (len(b) if b is not None else 0)
        if q + n > ev.kcap:
            _grow(<void**>&ev.kbuf, &ev.kcap, q + n, 1)
        ev.kbuf[q] = tag
        q += 1
        if tag == 1:
            ev.kbuf[q] = 1 if v else 0
            q += 1
        elif tag == 2 or tag == 5:
            q += _put_uv(ev.kbuf + q, <uint64_t>len(b))
            memcpy(ev.kbuf + q, PyBytes_AS_STRING(b), len(b))
            q += len(b)
        elif tag == 3:
            q += _put_uv(ev.kbuf + q, _zz(<int64_t>v))
        else:
            q += _put_f64(ev.kbuf + q, <double>v)
    return q


cdef tuple _q_key_values(const uint8_t* p, Py_ssize_t n):
    """The values a key encodes (for explanations); ValueError on a malformed key."""
    cdef Reader r
    cdef uint64_t u
    cdef double x
    cdef uint8_t tag
    out = []
    r.p = p
    r.pos = 0
    r.end = n
    while r.pos < r.end:
        tag = r.p[r.pos]
        r.pos += 1
        if tag == 1:
            if r.pos >= r.end or r.p[r.pos] > 1:
                _corrupt(b"bad value key")
            out.append(r.p[r.pos] == 1)
            r.pos += 1
        elif tag == 2 or tag == 5:
            _get_uv(&r, &u)
            if u > <uint64_t>(r.end - r.pos):
                _corrupt(b"bad value key")
            raw = (<const char*>p + r.pos)[:u]
            r.pos += u
            if tag == 2:
                out.append(raw.decode("utf-8", "surrogatepass"))
            else:
                if not raw or not raw.lstrip(b"-").isdigit():
                    _corrupt(b"bad value key")
                out.append(int(raw))
        elif tag == 3:
            _get_uv(&r, &u)
            out.append(_unzz(u))
        elif tag == 4:
            _get_f64(&r, &x)
            out.append(x)
        else:
            _corrupt(b"bad value key")
    return tuple(out)
