# Sequence and absence leaves: their values, next changes, progress and graft (included by _evaluator.pyx).
#
# The state these read is _sequences.pxi's (the layout, the caps, the cost); the
# semantics are _reference_sequences.py's.

# ---------------------------------------------------------------- evaluation

cdef inline bint _q_session_open(CompiledEvaluator ev, CompiledState st, int64_t session, int64_t now) noexcept:
    """Whether the leaf's records (of session ``session``) are the current session's, and it is open."""
    return st.session >= 0 and session == st.session and now < st.session_last_ts + ev.timeout


cdef inline int64_t _q_session_of(char* block, const LeafSpec* sp) noexcept nogil:
    """The session the leaf's records belong to (-1 for none), without opening an inline leaf."""
    cdef const uint8_t* p = <const uint8_t*>(block + sp.offset)
    cdef QState* qs
    cdef Py_ssize_t q = QI_DATA
    if sp.inl:
        if p[0] == QI_PACKED:
            return <int64_t>(_q_uv(p, &q) - 1) if sp.scope == SC_SESSION else -1
        return _qi_heap(p).session if p[0] == QI_SPILLED else -1
    qs = (<QState**>(block + sp.offset))[0]
    return qs.session if qs != NULL else -1


cdef int _q_compute_sequence(const LeafSpec* sp, QState* qs, int64_t now) except -1:
    cdef Py_ssize_t g, i
    cdef QGroup* grp
    cdef QEntry* buf
    cdef QTmp t
    cdef int64_t s[Q_MASK_BITS]
    cdef uint8_t has
    cdef bint found = False
    cdef int64_t best = 0, last = sp.nsteps - 1
    for g in range(qs.n):
        grp = _q_open(qs, sp, g, &t)
        has = grp.has
        memcpy(s, _qsum(grp, sp), sp.nsteps * sizeof(int64_t))
        buf = _qbuf(grp)
        for i in range(grp.n):
            _q_step(sp, &has, s, buf[i].ts, buf[i].code & ((1 << Q_MASK_BITS) - 1))
        if (has >> last) & 1 and (not found or s[last] > best):
            best = s[last]
            found = True
    qs.c_valid = True
    qs.c_from = now
    if sp.scope == SC_WITHIN:
        # a complete match is in the window until its first step leaves it
        qs.c_holds = found and now < _q_add(best, sp.window)
        qs.c_until = _q_add(best, sp.window) if qs.c_holds else NO_FLIP
    else:
        qs.c_holds = found
        qs.c_until = NO_FLIP
    return 0


cdef bint _q_cancelled(const LeafSpec* sp, const QEntry* buf, Py_ssize_t start, Py_ssize_t n, int64_t a) noexcept nogil:
    """Whether a B among buf[start:n] (all after the anchor) lands at most within after a."""
    cdef Py_ssize_t i
    for i in range(start, n):
        if buf[i].code & 2 and _q_within(buf[i].ts, a, sp.within):
            return True
    return False


cdef Py_ssize_t _q_intervals(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, QState* qs) except -1:
    """Every live anchor's membership interval, into ev.ivs as (lo, hi) pairs; how many."""
    cdef Py_ssize_t g, i, k, m = 0
    cdef QGroup* grp
    cdef QEntry* buf
    cdef QTmp t
    cdef int64_t* pend
    cdef int64_t a
    cdef bint pruned
    for g in range(qs.n):
        grp = _q_open(qs, sp, g, &t)
        k = 0
        pruned = False
        if sp.scope == SC_WITHIN and grp.n_iv and st.horizon != INT64_MIN:
            # intervals that ended before the horizon: no later query is inside them
            while k < grp.n_iv and grp.iv[2 * k + 1] <= st.horizon:
                k += 1
            if k:
                memmove(grp.iv, grp.iv + 2 * k, (grp.n_iv - k) * 2 * sizeof(int64_t))
                grp.n_iv = <uint16_t>(grp.n_iv - k)
                pruned = True
        if 2 * (m + grp.n_iv + grp.n_pend + grp.n) + 2 > ev.ivcap:
            _grow(<void**>&ev.ivs, &ev.ivcap, 2 * (m + grp.n_iv + grp.n_pend + grp.n) + 2, sizeof(int64_t))
        buf = _qbuf(grp)
        memcpy(ev.ivs + 2 * m, grp.iv, grp.n_iv * 2 * sizeof(int64_t))
        m += grp.n_iv
        pend = _qsum(grp, sp)
        for i in range(grp.n_pend + grp.n):
            if i < grp.n_pend:
                a = pend[i]
                if _q_cancelled(sp, buf, 0, grp.n, a):
                    continue
            else:
                k = i - grp.n_pend
                if not (buf[k].code & 1) or _q_cancelled(sp, buf, k + 1, grp.n, buf[k].ts):
                    continue
                a = buf[k].ts
            ev.ivs[2 * m] = _q_add(a, sp.within)
            ev.ivs[2 * m + 1] = _q_add(a, sp.window) if sp.scope == SC_WITHIN else INT64_MAX
            if ev.ivs[2 * m] < ev.ivs[2 * m + 1]:
                m += 1
        if pruned:
            _q_store(qs, sp, g, grp)  # fewer intervals (last: grp may be freed)
    return m


cdef int _q_compute_absence(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, QState* qs,
                            int64_t now) except -1:
    cdef Py_ssize_t m = _q_intervals(ev, st, sp, qs), i, j
    cdef int64_t* v = ev.ivs
    cdef int64_t lo, hi, until = NO_FLIP
    cdef bint holds = False
    # by lo (insertion sort: a handful of intervals)
    for i in range(1, m):
        lo = v[2 * i]
        hi = v[2 * i + 1]
        j = i
        while j > 0 and v[2 * (j - 1)] > lo:
            v[2 * j] = v[2 * (j - 1)]
            v[2 * j + 1] = v[2 * (j - 1) + 1]
            j -= 1
        v[2 * j] = lo
        v[2 * j + 1] = hi
    i = 0
    while i < m:  # merged runs of meeting intervals: in one, the person is a member throughout
        lo = v[2 * i]
        hi = v[2 * i + 1]
        i += 1
        while i < m and v[2 * i] <= hi:
            if v[2 * i + 1] > hi:
                hi = v[2 * i + 1]
            i += 1
        if now < lo:
            until = lo
            break
        if now < hi:
            holds = True
            until = hi
            break
    qs.c_valid = True
    qs.c_from = now
    qs.c_holds = holds
    qs.c_until = until
    return 0


cdef int _q_ensure(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now,
                   int64_t* until) except -1:
    """The leaf's value at now (1 or 0) through its cache, computed (and cached) when the cache does not
    cover now; until: the instant it next flips by itself (NO_FLIP for never)."""
    cdef QView v
    cdef QState* qs
    cdef const uint8_t* p = <const uint8_t*>(st.block + sp.offset)
    cdef int64_t tb, c_from, c_until
    cdef Py_ssize_t q
    cdef uint64_t u
    cdef int holds
    if sp.inl:
        if p[0] == QI_EMPTY:
            until[0] = NO_FLIP
            return 0  # never holds, never flips, at any instant
        if p[0] == QI_PACKED and p[1] & QI_CACHED:  # the cache, read in place
            memcpy(&tb, p + 4, sizeof(int64_t))
            q = QI_DATA + p[2]
            c_from = <int64_t>(<uint64_t>tb + <uint64_t>_unzz(_q_uv(p, &q)))
            u = _q_uv(p, &q)
            c_until = NO_FLIP if u == 0 else <int64_t>(<uint64_t>c_from + <uint64_t>_unzz(u - 1))
            if c_from <= now and now < c_until:
                until[0] = c_until
                return (p[1] & QI_HOLDS) != 0
    qs = _qstate(st.block, sp, &v)
    if qs == &_Q_EMPTY or (qs.c_valid and qs.c_from <= now and now < qs.c_until):
        until[0] = qs.c_until  # (_Q_EMPTY: never holds, never flips, at any instant)
        return qs.c_holds
    if sp.kind == KIND_SEQUENCE:
        _q_compute_sequence(sp, qs, now)
    else:
        _q_compute_absence(ev, st, sp, qs, now)
    until[0] = qs.c_until
    holds = qs.c_holds
    if sp.inl:
        _qi_commit(st.block, sp, qs)  # the cache (and any pruned intervals) back into its bytes
    return holds


cdef int _q_holds(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now) except -1:
    cdef int64_t until
    if sp.scope == SC_SESSION and not _q_session_open(ev, st, _q_session_of(st.block, sp), now):
        return False
    return _q_ensure(ev, st, sp, now, &until)


cdef int64_t _q_flip(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now) except? -1:
    cdef int64_t end, until
    cdef int holds
    if sp.scope == SC_SESSION:
        if not _q_session_open(ev, st, _q_session_of(st.block, sp), now):
            return NO_FLIP
        holds = _q_ensure(ev, st, sp, now, &until)
        end = st.session_last_ts + ev.timeout
        if holds:
            return end  # nothing in a session ends a match or an absence but the session's end
        return until if until < end else NO_FLIP
    _q_ensure(ev, st, sp, now, &until)
    return until


cdef bint _q_in_scope(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, const QState* qs, int64_t ts,
                      int64_t now) noexcept:
    if sp.scope == SC_WITHIN:
        return now < _q_add(ts, sp.window)
    if sp.scope == SC_SESSION:
        return _q_session_open(ev, st, qs.session, now)
    return True


cdef object _q_progress(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now):
    """reference._sequence_at / _absence_at from the bounded state: a SequenceProgress."""
    cdef QView v
    cdef QState* qs
    cdef Py_ssize_t g, i, k, found = -1
    cdef QGroup* grp
    cdef QEntry* buf
    cdef QTmp t
    cdef int64_t s[Q_MASK_BITS]
    cdef int64_t* pend
    cdef uint8_t has
    cdef int depth, best_depth = 0
    cdef int64_t best_ts = 0, a, f_ts = 0, f_code = 0
    if _q_holds(ev, st, sp, now):
        if sp.kind == KIND_ABSENCE:
            return SequenceProgress(2, None, ())
    qs = _qstate(st.block, sp, &v)  # (after _q_holds: caching the value may have moved it)
    for g in range(qs.n):
        grp = _q_open(qs, sp, g, &t)
        buf = _qbuf(grp)
        if sp.kind == KIND_SEQUENCE:
            has = grp.has
            memcpy(s, _qsum(grp, sp), sp.nsteps * sizeof(int64_t))
            for i in range(grp.n):
                _q_step(sp, &has, s, buf[i].ts, buf[i].code & ((1 << Q_MASK_BITS) - 1))
            for depth in range(sp.nsteps, 0, -1):
                if (has >> (depth - 1)) & 1 and _q_in_scope(ev, st, sp, qs, s[depth - 1], now):
                    a = s[depth - 1]
                    if (depth > best_depth or (depth == best_depth and (a > best_ts or (
                            a == best_ts and found >= 0 and _q_latest_after(grp, f_ts, f_code))))):
                        best_depth, best_ts, found = depth, a, g
                        f_ts, f_code = buf[grp.n - 1].ts, buf[grp.n - 1].code
                    break
        else:
            # the earliest anchor still waiting: final intervals not yet begun, live pending and buffered anchors
            pend = _qsum(grp, sp)
            for i in range(grp.n_iv + grp.n_pend + grp.n):
                if i < grp.n_iv:
                    if grp.iv[2 * i] <= now:
                        continue
                    a = grp.iv[2 * i] - sp.within
                elif i < grp.n_iv + grp.n_pend:
                    a = pend[i - grp.n_iv]
                    if _q_cancelled(sp, buf, 0, grp.n, a):
                        continue
                else:
                    k = i - grp.n_iv - grp.n_pend
                    a = buf[k].ts
                    if not (buf[k].code & 1) or _q_cancelled(sp, buf, k + 1, grp.n, a):
                        continue
                if not (now < _q_add(a, sp.within) and _q_in_scope(ev, st, sp, qs, a, now)):
                    continue
                if found < 0 or a < best_ts or (a == best_ts and _q_latest_after(grp, f_ts, f_code)):
                    best_depth, best_ts, found = 1, a, g
                    f_ts, f_code = buf[grp.n - 1].ts, buf[grp.n - 1].code
    if found < 0:
        return SequenceProgress(0, None, ())
    grp = _q_open(qs, sp, found, &t)
    return SequenceProgress(best_depth, best_ts, _q_key_values(grp.key, grp.klen))


cdef inline bint _q_latest_after(QGroup* a, int64_t ts, int64_t code) noexcept nogil:
    """Whether value a's latest remembered event is after (ts, code), another value's latest."""
    cdef QEntry* x = _qbuf(a)
    return _q_before(ts, code, x[a.n - 1].ts, x[a.n - 1].code)


# ---------------------------------------------------------------- graft (a backfill's new leaves)

cdef int _q_graft(CompiledState st, CompiledState dn, const LeafSpec* sp, const LeafSpec* dp,
                  bint same_session) except -1:
    """CompiledEvaluator.graft for a sequence leaf: the donor's value records, arrival numbers shifted.

    The donor saw the person's retained events in order, so its records are
    what this leaf keeps of them; only the arrival numbers move, by the
    state's count minus the donor's (their order, all the caps depend on, is
    kept). A SESSION leaf keeps them only when the donor's current session is
    the state's, as the other SESSION leaves do.
    """
    cdef QView v, dv
    cdef QState* qs
    cdef QState* ds = _qstate(dn.block, dp, &dv)
    cdef QGroup* grp
    cdef QEntry* buf
    cdef QTmp t
    cdef Py_ssize_t g, i
    cdef int64_t shift = st.seq - dn.seq, seq
    if (sp.kind != dp.kind or sp.scope != dp.scope or sp.nsteps != dp.nsteps or sp.within != dp.within
            or sp.reorder != dp.reorder or sp.nvalues != dp.nvalues or sp.nsame != dp.nsame
            or (sp.kind == KIND_ABSENCE and sp.npending != dp.npending)
            or (sp.scope == SC_WITHIN and sp.window != dp.window)):
        raise ValueError("graft: the two leaves keep different state")
    _q_free(st.block, sp)  # back to a leaf before its first event, then the donor's records
    if ds.n == 0 or (sp.scope == SC_SESSION and not (same_session and ds.session == dn.session)):
        return 0
    qs = _qstate_w(st.block, sp, &v)
    try:
        if sp.scope == SC_SESSION:
            qs.session = st.session
        for g in range(ds.n):
            grp = _q_open_copy(ds, dp, g, &t)  # the donor's key and intervals borrowed: _q_store copies them
            buf = _qbuf(grp)
            for i in range(grp.n):
                seq = (buf[i].code >> Q_MASK_BITS) + shift
                buf[i].code = ((seq if seq >= 1 else 1) << Q_MASK_BITS) | (buf[i].code & ((1 << Q_MASK_BITS) - 1))
            qs = _q_reserve(st.block, sp, qs, ds.tbase, <int64_t>(<uint64_t>ds.abase + <uint64_t>shift))
            _q_append(qs, sp, grp)
        qs.c_valid = False
    finally:
        _q_done(st.block, sp, qs)  # an inline leaf's back into its bytes
    return 0
