# Sequence and absence leaves: value records packed in their slots, unpacked to work on and packed back,
# spilled to the heap when they do not fit (included by _evaluator.pyx; the layout is described in
# _sequences.pxi).

# ---------------------------------------------------------------- state

cdef inline uint32_t _q_hash(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return <uint32_t>(h ^ (h >> 32))  # FNV-1a, folded: the scan compares it first, then the key


cdef inline uint64_t _q_uv(const uint8_t* p, Py_ssize_t* q) noexcept nogil:
    """A varint of a payload _q_pack wrote (trusted: no bounds checks)."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while True:
        b = p[q[0]]
        q[0] += 1
        v |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            return v
        shift += 7


cdef inline Py_ssize_t _q_put_rel(uint8_t* p, int64_t v, int64_t base) noexcept nogil:
    return _put_uv(p, _zz(<int64_t>(<uint64_t>v - <uint64_t>base)))


cdef inline int64_t _q_get_rel(const uint8_t* p, Py_ssize_t* q, int64_t base) noexcept nogil:
    return <int64_t>(<uint64_t>base + <uint64_t>_unzz(_q_uv(p, q)))


cdef Py_ssize_t _q_pack(const int64_t* bases, const LeafSpec* sp, QGroup* grp, uint8_t* p) noexcept nogil:
    """The record's payload into p (room for Q_PAYLOAD + 24 bytes): its length, or -1 when over Q_PAYLOAD.

        uv klen, key | u8 n, per buffered event: ts (zz from tbase, then uv deltas), uv zz(arrival - abase) << 5 | mask
        SEQUENCE: u8 has, zz summary[i] - tbase per set bit
        ABSENCE:  u8 n_pend, zz pending[i] - tbase each; uv n_iv, per interval zz lo - tbase, uv hi - lo (0: +inf)

    Every field is written exactly (64-bit wrapping differences), so unpacking gives the record back.
    """
    cdef Py_ssize_t q, i
    cdef int64_t tb = bases[0], ab = bases[1]
    cdef QEntry* buf = _qbuf(grp)
    cdef int64_t* s = _qsum(grp, sp)
    cdef uint64_t z
    if grp.klen > Q_PAYLOAD - 2:
        return -1
    q = _put_uv(p, <uint64_t>grp.klen)
    if grp.klen:
        memcpy(p + q, grp.key, grp.klen)
        q += grp.klen
    p[q] = grp.n
    q += 1
    for i in range(grp.n):
        if q > Q_PAYLOAD:
            return -1
        if i == 0:
            q += _q_put_rel(p + q, buf[0].ts, tb)
        else:
            q += _put_uv(p + q, <uint64_t>buf[i].ts - <uint64_t>buf[i - 1].ts)
        z = _zz(<int64_t>(<uint64_t>(buf[i].code >> Q_MASK_BITS) - <uint64_t>ab))
        if z >> (64 - Q_MASK_BITS):
            return -1  # an arrival number too far from abase to shift: kept spilled
        q += _put_uv(p + q, (z << Q_MASK_BITS) | <uint64_t>(buf[i].code & ((1 << Q_MASK_BITS) - 1)))
    if q > Q_PAYLOAD:
        return -1
    if sp.kind == KIND_SEQUENCE:
        p[q] = grp.has
        q += 1
        for i in range(sp.nsteps):
            if (grp.has >> i) & 1:
                if q > Q_PAYLOAD:
                    return -1
                q += _q_put_rel(p + q, s[i], tb)
        return q if q <= Q_PAYLOAD else -1
    p[q] = grp.n_pend
    q += 1
    for i in range(grp.n_pend):
        if q > Q_PAYLOAD:
            return -1
        q += _q_put_rel(p + q, s[i], tb)
    if q > Q_PAYLOAD or grp.n_iv >= Q_TMP_IV:
        return -1
    q += _put_uv(p + q, grp.n_iv)
    for i in range(grp.n_iv):
        if q > Q_PAYLOAD:
            return -1
        q += _q_put_rel(p + q, grp.iv[2 * i], tb)
        q += _put_uv(p + q, 0 if grp.iv[2 * i + 1] == INT64_MAX
                     else <uint64_t>grp.iv[2 * i + 1] - <uint64_t>grp.iv[2 * i])
    return q if q <= Q_PAYLOAD else -1


cdef void _q_unpack(const int64_t* bases, const LeafSpec* sp, const uint8_t* p, QTmp* t) noexcept nogil:
    """A packed payload (_q_pack's) into t.g: the key borrowed from the payload, the intervals in t's room."""
    cdef QGroup* grp = &t.g
    cdef QEntry* buf
    cdef int64_t* s
    cdef int64_t tb = bases[0], ab = bases[1], ts = 0
    cdef Py_ssize_t q = 0, i
    cdef uint64_t u
    memset(grp, 0, sizeof(QGroup))
    grp.klen = <int32_t>_q_uv(p, &q)
    if grp.klen:
        grp.key = <uint8_t*>(p + q)  # borrowed from the slot: _q_store packs it aside before writing the slot
        q += grp.klen
    grp.n = p[q]
    q += 1
    buf = _qbuf(grp)
    for i in range(grp.n):
        if i == 0:
            ts = _q_get_rel(p, &q, tb)
        else:
            ts = <int64_t>(<uint64_t>ts + _q_uv(p, &q))
        buf[i].ts = ts
        u = _q_uv(p, &q)
        buf[i].code = <int64_t>(((<uint64_t>ab + <uint64_t>_unzz(u >> Q_MASK_BITS)) << Q_MASK_BITS)
                                | (u & ((1 << Q_MASK_BITS) - 1)))
    s = _qsum(grp, sp)
    grp.iv = t.ivs
    grp.iv_cap = Q_TMP_IV
    if sp.kind == KIND_SEQUENCE:
        grp.has = p[q]
        q += 1
        for i in range(sp.nsteps):
            s[i] = _q_get_rel(p, &q, tb) if (grp.has >> i) & 1 else 0
        return
    grp.n_pend = p[q]
    q += 1
    for i in range(grp.n_pend):
        s[i] = _q_get_rel(p, &q, tb)
    grp.n_iv = <uint16_t>_q_uv(p, &q)
    for i in range(grp.n_iv):
        t.ivs[2 * i] = _q_get_rel(p, &q, tb)
        u = _q_uv(p, &q)
        t.ivs[2 * i + 1] = INT64_MAX if u == 0 else <int64_t>(<uint64_t>t.ivs[2 * i] + u)


cdef inline void _q_fresh(QTmp* t, const LeafSpec* sp, const uint8_t* key, Py_ssize_t klen) noexcept nogil:
    """t.g a new, empty record of the key (borrowed)."""
    memset(&t.g, 0, sp.gsize)
    t.g.key = <uint8_t*>key if klen else NULL
    t.g.klen = <int32_t>klen
    t.g.iv = t.ivs
    t.g.iv_cap = Q_TMP_IV


cdef inline QGroup* _q_open(const QState* qs, const LeafSpec* sp, Py_ssize_t g, QTmp* t) noexcept nogil:
    """Record g: the spilled record itself, or unpacked into t. Writers then _q_store it back."""
    cdef const uint8_t* slot = _q_slot(qs, g)
    if slot[0] == Q_SPILLED:
        return _q_spilled(slot)
    _q_unpack(_q_bases(qs), sp, slot + 1, t)
    return &t.g


cdef QGroup* _q_open_copy(const QState* qs, const LeafSpec* sp, Py_ssize_t g, QTmp* t) noexcept nogil:
    """Record g as a copy in t, whatever its slot (a spilled one's key and intervals borrowed, read only)."""
    cdef const uint8_t* slot = _q_slot(qs, g)
    cdef QGroup* rec
    if slot[0] != Q_SPILLED:
        _q_unpack(_q_bases(qs), sp, slot + 1, t)
        return &t.g
    rec = _q_spilled(slot)
    memcpy(&t.g, rec, sp.gsize)
    t.g.iv_heap = 0
    t.g.iv_cap = t.g.n_iv  # any interval added would go to a copy of its own
    return &t.g


cdef void _q_free_rec(QGroup* rec) noexcept nogil:
    free(rec.key)
    if rec.iv_heap:
        free(rec.iv)
    free(rec)


cdef inline void _q_drop_tmp(QGroup* grp) noexcept nogil:
    """An unpacked record's intervals, when an operation moved them to the heap."""
    if grp.iv_heap:
        free(grp.iv)
        grp.iv_heap = 0
        grp.iv = NULL
        grp.n_iv = 0


cdef int _q_store(QState* qs, const LeafSpec* sp, Py_ssize_t g, QGroup* grp) except -1:
    """grp (unpacked, or slot g's spilled record itself) into slot g: packed when it fits, else spilled.

    Slot g is in use (packed or spilled) or cleared (byte 0 is 0). grp must not be used after this."""
    cdef uint8_t pk[Q_PAYLOAD + 32]
    cdef uint8_t* slot = _q_slot(qs, g)
    cdef QGroup* old = _q_spilled(slot) if slot[0] == Q_SPILLED else NULL
    cdef QGroup* rec
    cdef int64_t nb[2]
    cdef Py_ssize_t n
    if sp.nsame == 0 and g == 0 and grp.n:
        # the leaf's only record: its bases its own oldest buffered event, so its offsets stay small
        nb[0] = _qbuf(grp)[0].ts
        nb[1] = _qbuf(grp)[0].code >> Q_MASK_BITS
        n = _q_pack(nb, sp, grp, pk)
        if n >= 0:
            qs.tbase = nb[0]
            qs.abase = nb[1]
    else:
        n = _q_pack(_q_bases(qs), sp, grp, pk)
    if n >= 0:
        if old != NULL:
            _q_free_rec(old)  # grp may be old: it is packed in pk already
        if grp != old:
            _q_drop_tmp(grp)
        slot[0] = <uint8_t>n
        memcpy(slot + 1, pk, n)
        return 0
    if grp == old:
        return 0  # still too big: stays where it is
    rec = <QGroup*>malloc(sp.gsize)
    if rec == NULL:
        raise MemoryError()
    memcpy(rec, grp, sp.gsize)
    rec.key = NULL
    rec.iv = NULL
    rec.iv_cap = 0
    rec.iv_heap = 0
    if grp.klen:
        rec.key = <uint8_t*>malloc(grp.klen)
        if rec.key == NULL:
            free(rec)
            raise MemoryError()
        memcpy(rec.key, grp.key, grp.klen)
    if grp.iv_heap:
        rec.iv, rec.iv_cap, rec.iv_heap = grp.iv, grp.iv_cap, 1
        grp.iv, grp.iv_heap = NULL, 0
    elif grp.n_iv:
        rec.iv = <int64_t*>malloc(grp.n_iv * 2 * sizeof(int64_t))
        if rec.iv == NULL:
            free(rec.key)
            free(rec)
            raise MemoryError()
        memcpy(rec.iv, grp.iv, grp.n_iv * 2 * sizeof(int64_t))
        rec.iv_cap = grp.n_iv
        rec.iv_heap = 1
    if old != NULL:
        _q_free_rec(old)
    slot[0] = Q_SPILLED
    memcpy(slot + 1, &rec, sizeof(QGroup*))
    return 0


cdef inline bint _q_key_is(const QState* qs, Py_ssize_t g, const uint8_t* key, Py_ssize_t klen) noexcept nogil:
    cdef const uint8_t* slot = _q_slot(qs, g)
    cdef QGroup* rec
    cdef Py_ssize_t q = 1
    if slot[0] == Q_SPILLED:
        rec = _q_spilled(slot)
        return rec.klen == klen and (klen == 0 or memcmp(rec.key, key, klen) == 0)
    return <Py_ssize_t>_q_uv(slot, &q) == klen and (klen == 0 or memcmp(slot + q, key, klen) == 0)


cdef void _q_latest(const QState* qs, const LeafSpec* sp, Py_ssize_t g, int64_t* ts, int64_t* code) noexcept nogil:
    """(ts, code) of record g's latest remembered event, buf[n - 1]."""
    cdef const uint8_t* slot = _q_slot(qs, g)
    cdef QGroup* rec
    cdef Py_ssize_t q = 1, i, n
    cdef int64_t t = 0
    cdef uint64_t u = 0
    if slot[0] == Q_SPILLED:
        rec = _q_spilled(slot)
        ts[0] = _qbuf(rec)[rec.n - 1].ts
        code[0] = _qbuf(rec)[rec.n - 1].code
        return
    q += <Py_ssize_t>_q_uv(slot, &q)
    n = slot[q]
    q += 1
    for i in range(n):
        if i == 0:
            t = _q_get_rel(slot, &q, _q_bases(qs)[0])
        else:
            t = <int64_t>(<uint64_t>t + _q_uv(slot, &q))
        u = _q_uv(slot, &q)
    ts[0] = t
    code[0] = <int64_t>(((<uint64_t>_q_bases(qs)[1] + <uint64_t>_unzz(u >> Q_MASK_BITS)) << Q_MASK_BITS)
                        | (u & ((1 << Q_MASK_BITS) - 1)))


cdef void _q_clear(QState* qs, const LeafSpec* sp) noexcept nogil:
    cdef Py_ssize_t g
    cdef uint8_t* slot
    for g in range(qs.n):
        slot = _q_slot(qs, g)
        if slot[0] == Q_SPILLED:
            _q_free_rec(_q_spilled(slot))
        slot[0] = 0
    qs.n = 0
    qs.c_valid = False


cdef void _q_free(char* block, const LeafSpec* sp) noexcept nogil:
    """Back to a leaf before its first relevant event."""
    cdef QState** slot = <QState**>(block + sp.offset)
    cdef uint8_t* p = <uint8_t*>(block + sp.offset)
    cdef QState* heap
    if sp.inl:
        if p[0] == QI_SPILLED:
            heap = _qi_heap(p)
            _q_clear(heap, sp)
            free(heap)
        memset(p, 0, Q_INLINE)
        return
    if slot[0] == NULL:
        return
    _q_clear(slot[0], sp)
    free(slot[0])
    slot[0] = NULL


# ---------------------------------------------------------------- inline leaves (no same)

cdef uint32_t _Q_HASH0 = _q_hash(NULL, 0)  # the empty key's


cdef inline QState* _qi_heap(const uint8_t* p) noexcept nogil:
    """A spilled inline leaf's QState."""
    cdef QState* qs
    memcpy(&qs, p + 8, sizeof(QState*))
    return qs


cdef void _qi_open(const uint8_t* p, const LeafSpec* sp, QView* v) noexcept nogil:
    """An inline leaf's bytes (QI_EMPTY or QI_PACKED) as the current layout with one slot, in v."""
    cdef Py_ssize_t q = QI_DATA, end
    cdef uint64_t u
    memset(&v.h, 0, sizeof(QState))
    v.h.cap = 1
    v.h.session = -1
    v.hash = _Q_HASH0
    v.slot[0] = 0
    if p[0] != QI_PACKED:
        return
    memcpy(&v.h.tbase, p + 4, sizeof(int64_t))
    if sp.scope == SC_SESSION:
        v.h.session = <int64_t>(_q_uv(p, &q) - 1)
    v.h.abase = _unzz(_q_uv(p, &q))
    end = QI_DATA + p[2]
    v.slot[0] = <uint8_t>(end - q + 1)
    v.slot[1] = 0  # the payload's key length, not kept inline (no same: always 0)
    memcpy(v.slot + 2, p + q, end - q)
    v.h.n = 1
    if p[1] & QI_CACHED:
        q = end
        v.h.c_from = <int64_t>(<uint64_t>v.h.tbase + <uint64_t>_unzz(_q_uv(p, &q)))
        u = _q_uv(p, &q)
        v.h.c_until = NO_FLIP if u == 0 else <int64_t>(<uint64_t>v.h.c_from + <uint64_t>_unzz(u - 1))
        v.h.c_valid = True
        v.h.c_holds = (p[1] & QI_HOLDS) != 0


cdef int _qi_commit(char* block, const LeafSpec* sp, QState* qs) except -1:
    """An inline leaf's state back into its bytes after a change: qs is the QView header _qstate_w gave
    or the leaf's spilled QState. Inline when its record is packed and fits with its prefix (the cache
    too, when it fits); else the current layout on the heap. qs must not be used after this."""
    cdef uint8_t* p = <uint8_t*>(block + sp.offset)
    cdef QState* heap = _qi_heap(p) if p[0] == QI_SPILLED else NULL
    cdef uint8_t pre[48]  # the prefix (at most 20 bytes), then the cache (at most 20)
    cdef uint8_t* slot
    cdef Py_ssize_t k = 0, total, c = 0
    cdef uint64_t z
    cdef uint8_t flags = 0
    if qs.n == 0:
        if heap != NULL:
            _q_clear(heap, sp)
            free(heap)
        memset(p, 0, Q_INLINE)
        return 0
    slot = _q_slot(qs, 0)
    if slot[0] != Q_SPILLED:
        if sp.scope == SC_SESSION:
            k = _put_uv(pre, <uint64_t>qs.session + 1)
        k += _put_uv(pre + k, _zz(qs.abase))
        total = k + slot[0] - 1  # (the payload's key length, always 0, is not kept)
        if total <= QI_ROOM:
            if qs.c_valid:
                c = _put_uv(pre + k, _zz(<int64_t>(<uint64_t>qs.c_from - <uint64_t>qs.tbase)))
                z = 0 if qs.c_until == NO_FLIP else _zz(<int64_t>(<uint64_t>qs.c_until - <uint64_t>qs.c_from))
                if z != 0xFFFFFFFFFFFFFFFFULL:  # (else not cacheable: 0 is NO_FLIP's)
                    c += _put_uv(pre + k + c, z + 1 if qs.c_until != NO_FLIP else 0)
                    if total + c <= QI_ROOM:
                        flags = QI_CACHED | (QI_HOLDS if qs.c_holds else 0)
            # (qs may be the heap QState: all of it is read before p is written)
            memcpy(p + 4, &qs.tbase, sizeof(int64_t))
            memmove(p + QI_DATA + k, slot + 2, slot[0] - 1)
            if flags:
                memcpy(p + QI_DATA + total, pre + k, c)
            memcpy(p + QI_DATA, pre, k)
            p[1] = flags
            p[2] = <uint8_t>total
            p[3] = 0
            p[0] = QI_PACKED
            free(heap)  # (its one slot was packed: it owned nothing else)
            return 0
    if heap == NULL:  # qs is the view: to the heap
        heap = <QState*>malloc(sizeof(QView))
        if heap == NULL:
            if slot[0] == Q_SPILLED:
                _q_free_rec(_q_spilled(slot))
            raise MemoryError()
        memcpy(heap, qs, sizeof(QView))
        p[0] = QI_SPILLED
        memcpy(p + 8, &heap, sizeof(QState*))
    return 0


cdef Py_ssize_t _q_stored(const QState* qs, const LeafSpec* sp) noexcept nogil:
    """Events kept as they are (the reorder buffers) and pending anchors."""
    cdef Py_ssize_t g, total = 0
    cdef QGroup* grp
    cdef QTmp t
    for g in range(qs.n):
        grp = _q_open(qs, sp, g, &t)
        total += grp.n + grp.n_pend
    return total


cdef Py_ssize_t _q_nbytes(const QState* qs, const LeafSpec* sp) noexcept nogil:
    """Bytes of the QState's allocation and its spilled records (not for a QView: see _q_leaf_nbytes)."""
    cdef Py_ssize_t g, total = 0
    cdef QGroup* rec
    if qs == &_Q_EMPTY:
        return 0
    total = sizeof(QState) + qs.cap * (sizeof(uint32_t) + Q_SLOT)
    for g in range(qs.n):
        if _q_slot(qs, g)[0] == Q_SPILLED:
            rec = _q_spilled(_q_slot(qs, g))
            total += sp.gsize + rec.klen + rec.iv_cap * 2 * sizeof(int64_t)
    return total


cdef Py_ssize_t _q_leaf_nbytes(char* block, const LeafSpec* sp) noexcept nogil:
    """Bytes the leaf holds beyond its place in the block (an inline leaf: 0 unless spilled)."""
    cdef const uint8_t* p = <const uint8_t*>(block + sp.offset)
    cdef QView v
    if sp.inl:
        return _q_nbytes(_qi_heap(p), sp) if p[0] == QI_SPILLED else 0
    return _q_nbytes(_qstate(block, sp, &v), sp)
