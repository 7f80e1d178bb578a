# The state codec's section payload for sequence and absence leaves (included by _evaluator.pyx).
#
# Same primitives and base B (the session's last ts) as the other payloads:
#
#     uv   number of values (a SESSION leaf whose session is over is written empty)
#     per value, in memory order:
#       uv len, then the value key (see _q_key)
#       uv n, then the reorder buffer: ts (zz from B, then uv deltas; ascending), uv code
#       SEQUENCE: u8 has, then per set bit (ascending): zz summary[i] - B
#       ABSENCE:  uv n_pend, zz pending[i] - B each; uv n_iv, then per final interval
#                 zz lo - B, uv hi - lo (0: open-ended)
#
# Intervals that ended before the horizon are not written (a query drops them
# anyway), so a dump does not depend on the queries before it. Load bounds
# every count by the caps and the bytes left, and checks every invariant the
# evaluation relies on (order, distinct keys, arrival numbers, masks).


cdef Py_ssize_t _q_section_bound(CompiledState st, const LeafSpec* sp) noexcept:
    cdef QView v
    cdef QState* qs = _qstate(st.block, sp, &v)
    cdef Py_ssize_t g, total = 10
    cdef QGroup* grp
    cdef QTmp t
    for g in range(qs.n):
        grp = _q_open(qs, sp, g, &t)
        total += 20 + grp.klen + 20 * grp.n + 1 + 10 * sp.nsum + 10 + 20 * grp.n_iv
    return total


cdef inline Py_ssize_t _q_put_ts(uint8_t* p, int64_t v, int64_t base) noexcept nogil:
    return _put_uv(p, _zz(<int64_t>(<uint64_t>v - <uint64_t>base)))


cdef Py_ssize_t _q_put_section(CompiledState st, const LeafSpec* sp, uint8_t* p) noexcept:
    cdef QView v
    cdef QState* qs = _qstate(st.block, sp, &v)
    cdef Py_ssize_t g, i, q = 0, k, n_iv
    cdef QGroup* grp
    cdef QEntry* buf
    cdef QTmp t
    cdef int64_t* s
    cdef int64_t base = st.session_last_ts
    if qs.n == 0 or (sp.scope == SC_SESSION and qs.session != st.session):
        return 0
    q += _put_uv(p + q, <uint64_t>qs.n)
    for g in range(qs.n):
        grp = _q_open(qs, sp, g, &t)
        q += _put_uv(p + q, <uint64_t>grp.klen)
        if grp.klen:
            memcpy(p + q, grp.key, grp.klen)
            q += grp.klen
        buf = _qbuf(grp)
        q += _put_uv(p + q, <uint64_t>grp.n)
        for i in range(grp.n):
            if i == 0:
                q += _q_put_ts(p + q, buf[i].ts, base)
            else:
                q += _put_uv(p + q, <uint64_t>buf[i].ts - <uint64_t>buf[i - 1].ts)
            q += _put_uv(p + q, <uint64_t>buf[i].code)
        s = _qsum(grp, sp)
        if sp.kind == KIND_SEQUENCE:
            p[q] = grp.has
            q += 1
            for i in range(sp.nsteps):
                if (grp.has >> i) & 1:
                    q += _q_put_ts(p + q, s[i], base)
            continue
        q += _put_uv(p + q, <uint64_t>grp.n_pend)
        for i in range(grp.n_pend):
            q += _q_put_ts(p + q, s[i], base)
        k = 0
        if sp.scope == SC_WITHIN and st.horizon != INT64_MIN:
            while k < grp.n_iv and grp.iv[2 * k + 1] <= st.horizon:
                k += 1
        n_iv = grp.n_iv - k
        q += _put_uv(p + q, <uint64_t>n_iv)
        for i in range(k, grp.n_iv):
            q += _q_put_ts(p + q, grp.iv[2 * i], base)
            q += _put_uv(p + q, 0 if grp.iv[2 * i + 1] == INT64_MAX
                         else <uint64_t>grp.iv[2 * i + 1] - <uint64_t>grp.iv[2 * i])
    return q


cdef inline int _q_get_ts(Reader* r, int64_t base, int64_t* out) except -1:
    cdef uint64_t u
    _get_uv(r, &u)
    out[0] = <int64_t>(<uint64_t>base + <uint64_t>_unzz(u))
    return 0


cdef QState* _q_get_group(CompiledState st, const LeafSpec* sp, QState* qs, Reader* r) except NULL:
    """One value's record from the section, appended to qs (_qstate_w's): qs, or where it moved."""
    cdef QTmp t
    cdef QGroup* grp = &t.g
    _q_fresh(&t, sp, NULL, 0)
    try:
        _q_read_group(st, sp, qs, r, &t)
        qs = _q_reserve(st.block, sp, qs, st.session_last_ts, st.seq)
        _q_append(qs, sp, grp)
    except BaseException:
        _q_drop_tmp(grp)
        raise
    return qs


cdef int _q_read_group(CompiledState st, const LeafSpec* sp, QState* qs, Reader* r, QTmp* t) except -1:
    """One value's record from the section into t (its key borrowed from the section's bytes)."""
    cdef QGroup* grp = &t.g
    cdef QEntry* buf
    cdef int64_t* s
    cdef int64_t base = st.session_last_ts, mask, ts = 0, lo, prev_hi = INT64_MIN
    cdef uint64_t u, klen, n
    cdef Py_ssize_t i, g
    _get_uv(r, &klen)
    if klen > <uint64_t>(r.end - r.pos) or (klen == 0) != (sp.nsame == 0):
        _corrupt(b"bad value key length")
    if klen:
        if len(_q_key_values(r.p + r.pos, <Py_ssize_t>klen)) != sp.nsame:
            _corrupt(b"value key of another leaf")
        for g in range(qs.n):
            if _q_key_is(qs, g, r.p + r.pos, <Py_ssize_t>klen):
                _corrupt(b"a value twice")
        grp.key = <uint8_t*>(r.p + r.pos)
        grp.klen = <int32_t>klen
    r.pos += klen
    _get_uv(r, &n)
    if n == 0 or n > <uint64_t>sp.reorder:
        _corrupt(b"reorder buffer size out of range")
    buf = _qbuf(grp)
    for i in range(<Py_ssize_t>n):
        if i == 0:
            _q_get_ts(r, base, &ts)
        else:
            _get_uv(r, &u)
            if u > <uint64_t>INT64_MAX - <uint64_t>ts:
                _corrupt(b"timestamp beyond 64 bits")
            ts = <int64_t>(<uint64_t>ts + u)
        _get_uv(r, &u)
        mask = <int64_t>(u & ((1 << Q_MASK_BITS) - 1))
        if (u >> Q_MASK_BITS) == 0 or (u >> Q_MASK_BITS) > <uint64_t>st.seq or mask == 0 or mask >> sp.nsteps:
            _corrupt(b"buffered event out of range")
        buf[i].ts = ts
        buf[i].code = <int64_t>u
        if i and not _q_before(buf[i - 1].ts, buf[i - 1].code, ts, buf[i].code):
            _corrupt(b"buffered events out of order")
        grp.n = <uint8_t>(i + 1)
    s = _qsum(grp, sp)
    if sp.kind == KIND_SEQUENCE:
        if r.pos >= r.end:
            _corrupt(b"truncated")
        grp.has = r.p[r.pos]
        r.pos += 1
        if grp.has >> sp.nsteps:
            _corrupt(b"summary out of range")
        for i in range(sp.nsteps):
            if (grp.has >> i) & 1:
                _q_get_ts(r, base, &s[i])
        return 0
    _get_uv(r, &n)
    if n > <uint64_t>sp.npending:
        _corrupt(b"more pending anchors than the cap")
    for i in range(<Py_ssize_t>n):
        _q_get_ts(r, base, &s[i])
        grp.n_pend = <uint8_t>(i + 1)
    _get_uv(r, &n)
    if n > <uint64_t>((r.end - r.pos) // 2) or n > 0xFFFF:
        _corrupt(b"more intervals than bytes")
    for i in range(<Py_ssize_t>n):
        _q_get_ts(r, base, &lo)
        _get_uv(r, &u)
        if u > <uint64_t>INT64_MAX - <uint64_t>lo or (i and lo <= prev_hi):
            _corrupt(b"intervals out of order")
        prev_hi = INT64_MAX if u == 0 else <int64_t>(<uint64_t>lo + u)
        if (u == 0) != (sp.scope != SC_WITHIN) or (i and u == 0):
            _corrupt(b"interval of another scope")
        _q_add_iv_raw(grp, lo, prev_hi)
    return 0


cdef int _q_add_iv_raw(QGroup* grp, int64_t lo, int64_t hi) except -1:
    _q_iv_room(grp)
    grp.iv[2 * grp.n_iv] = lo
    grp.iv[2 * grp.n_iv + 1] = hi
    grp.n_iv += 1
    return 0


cdef int _q_get_section(CompiledState st, const LeafSpec* sp, Reader* r) except -1:
    cdef QView v
    cdef QState* qs
    cdef uint64_t n
    cdef Py_ssize_t g
    _get_uv(r, &n)
    if n == 0 or n > <uint64_t>sp.nvalues or n > <uint64_t>(r.end - r.pos):
        _corrupt(b"number of values out of range")
    if sp.scope == SC_SESSION and st.session < 0:
        _corrupt(b"a session's sequence state with no session")
    qs = _qstate_w(st.block, sp, &v)
    try:
        if sp.scope == SC_SESSION:
            qs.session = st.session
        for g in range(<Py_ssize_t>n):
            qs = _q_get_group(st, sp, qs, r)  # (may move the QState)
        qs.c_valid = False
    finally:
        _q_done(st.block, sp, qs)  # an inline leaf's back into its bytes
    return 0
