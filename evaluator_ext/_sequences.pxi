# Sequence and absence leaves (program.SequenceLeaf): bounded state, observe, evaluation.
#
# Included by _evaluator.pyx. The semantics, and the caps that bound the state,
# are _reference_sequences.py's; this is how they are kept in C. The packed
# slots are _sequences_slots.pxi's, a leaf's spec and plans _sequences_plans.pxi's.
#
# Per person and leaf *with* ``same``, the person's block holds a pointer to the
# leaf's QState (NULL before its first relevant event: readers then see
# _Q_EMPTY). A leaf *without* ``same`` keeps its state *inline* instead (below).
# The QState heads one allocation: the bases packed fields are relative to, the session
# and the cache, then the record hashes and up to ``values`` *slots* of Q_SLOT
# bytes, one per distinct ``same`` value (one slot when the leaf has no ``same``):
#
#   QState (48 bytes) | uint32_t hashes[cap] | uint8_t slot[cap][Q_SLOT]
#
# A slot holds its value record *packed*: byte 0 the payload's length, then the
# payload, the record's fields as varints (much as the dump writes them, but
# relative to the QState's bases; _q_pack). A record whose payload does not fit
# (a long key, timestamps far from tbase, many events, intervals or steps) is
# *spilled*: byte 0 is Q_SPILLED and the slot holds a pointer to the record
# unpacked on the heap.
# Packing is exact for any field values, so spilling is only a matter of space:
# every operation unpacks a record (_q_open), works on the unpacked form, which
# is the one below, and packs it back (_q_store), spilled only when it must be
# (and packed again once it fits). The unpacked record, sp.gsize bytes:
#
#   QGroup header | QEntry buf[reorder] | int64_t summary[nsum]
#
# - buf: the value's ``reorder`` latest remembered events (ts, arrival << 5 |
#   the steps they can fill), ascending by (ts, arrival). An event older than
#   all of them when buf is full is too late (cap 2). When a newer one comes,
#   buf[0] is *folded* into the summary: every later remembered event is after
#   it, so the summary only ever sees events in order.
# - SEQUENCE summary: summary[i] (with bit i of ``has``) is the latest first-step
#   timestamp of a partial match through step i among the folded events; the
#   last one is a complete match. Latest-start dominates: it stays in a window
#   longest and leaves the most room under ``within``, and every later event
#   can extend it. Evaluation runs the same step over buf, in order, on a copy.
# - ABSENCE summary: the pending anchors (at most ``pending``, earliest first;
#   cap 3) and ``iv``, the final anchors as merged membership intervals
#   [A + within, A + window) (SESSION/EVER: [A + within, +inf), so one). An
#   interval that ended before the horizon is dropped: no later query can be
#   inside it.
# - The value key: the canonical encoding of the ``same`` values (below), compared
#   bytewise. The record whose buf[n-1] is the oldest is the one cap 1 evicts.
#
# Inline leaves (no ``same``: exactly one value record, the empty key's). The
# leaf's place in the person's block is Q_INLINE = 64 bytes, whatever its state:
#
#   byte 0      tag: QI_EMPTY (0, a calloc'd block: before the first relevant
#               event, or no record), QI_PACKED, QI_SPILLED
#   byte 1      flags: QI_CACHED (the cache below is set), QI_HOLDS (its value)
#   byte 2      len: the record's bytes at data[0:len]
#   bytes 4-11  QI_PACKED: tbase (int64); QI_SPILLED: bytes 8-15, the QState*
#   bytes 12-63 data (QI_ROOM = 52 bytes):
#     [uv session + 1, SESSION leaves] uv zz(abase) | the slot's payload, as
#     _q_pack writes it relative to (tbase, abase), but for its first byte (the
#     key's length, always 0) | the cache, when QI_CACHED:
#     uv zz(c_from - tbase), uv 0 (c_until is NO_FLIP) or zz(c_until - c_from) + 1
#
# The bases are the record's own: _q_store rebases a leaf's only record on its
# oldest buffered event before packing it, so they are folded into the record
# (its first timestamp and arrival number cost a byte each) rather than kept
# apart as 16 bytes that grow stale. Every reader and writer works on the
# current layout: an inline leaf is opened into a QView on the stack (QState,
# hash and one slot, the layout above with cap 1: the payload is copied, not
# unpacked) and a writer hands it back (_q_done), packed inline when the
# prefix and payload fit in QI_ROOM. The cache goes in the bytes left after the
# record, and only when it fits and is exact; when it does not, the value is
# recomputed at each query (costs time, never answers). A record whose payload
# does not fit is *spilled* to the current layout: a heap QState with one slot
# (QI_SPILLED, the block holding its pointer), moved back inline once it fits.
#
# Bound, per person and leaf without ``same``: 64 bytes, inline, while the
# record fits (prefix + payload <= 52 bytes; the payload is at most 59 in a
# slot); spilled: + sizeof(QState) + 4 +
# Q_SLOT = 112 bytes (and the spilled record's, below, if it does not fit its
# slot either). With ``same``: a pointer (8 bytes) before its first relevant
# event; then sizeof(QState) + values * (4 + Q_SLOT) = 48 + 64 * values bytes
# more, each
# value's record packed in its 64 bytes of hash and slot when its payload is at
# most Q_SLOT - 1 = 59 bytes (typically: key ~8 B, 3-4 bytes per buffered event,
# 1-4 per summary timestamp or interval, near tbase); a spilled record adds
# sizeof(QGroup) + 16 * reorder + 8 * nsum + key bytes + 16 bytes per final
# interval (one for SESSION/EVER; for WITHIN at most (window + how far
# timestamps run ahead of the clock) / (window - within) + 1 alive). Nothing
# grows with the events.
#
# Cost: observe runs each step's filters on events of its model, builds the
# value key, finds the record (a scan of at most ``values`` hashes, then the
# key), unpacks it, inserts into buf (at most ``reorder`` moves) and packs it.
# A leaf's value is cached with the instant it next flips, like a WITHIN leaf's;
# recomputing it is one pass over each record, unpacked, and its buf (times the
# steps) or its intervals.

cdef struct QEntry:
    int64_t ts
    int64_t code  # arrival number << 5 | mask (bit i: the event can fill step i; ABSENCE: 1 A, 2 B)


cdef struct QGroup:
    uint8_t* key  # the value key (NULL when the leaf has no same); a spilled record owns it, an unpacked one borrows
    int64_t* iv  # ABSENCE: final intervals, (lo, hi) pairs, ascending, disjoint
    int32_t klen
    uint16_t n_iv
    uint16_t iv_cap
    uint8_t n  # buf entries used (>= 1 in a record in use)
    uint8_t has  # SEQUENCE: bit i, summary[i] is set
    uint8_t n_pend  # ABSENCE: pending anchors in summary[0:n_pend]
    uint8_t iv_heap  # iv is malloc'd and owned (else NULL or a QTmp's inline array)


cdef struct QState:
    # The head of the leaf's one allocation: then uint32_t hashes[cap] and cap slots (above); n in use.
    int64_t tbase  # the bases packed timestamps and arrival numbers are relative to
    int64_t abase
    int64_t session  # SESSION: the session the records belong to; -1 for none
    int64_t c_from  # the cache: c_holds for c_from <= now < c_until (session end aside)
    int64_t c_until
    uint16_t n
    uint16_t cap
    uint8_t c_valid
    uint8_t c_holds


cdef enum:
    Q_MASK_BITS = 5  # a mask takes the low 5 bits of QEntry.code: at most 5 steps
    Q_MAX_REORDER = 64
    Q_MAX_VALUES = 4096
    Q_MAX_PENDING = 64
    Q_SLOT = 60  # bytes of a slot: with its 4-byte hash, a value record is 64 bytes
    Q_PAYLOAD = Q_SLOT - 1
    Q_SPILLED = 0xFF  # slot byte 0 of a spilled record (a payload is at most Q_PAYLOAD bytes)
    Q_TMP_IV = 30  # a packed record has fewer intervals: each takes at least 2 payload bytes


cdef enum:
    Q_INLINE = 64  # bytes of an inline leaf's place in the person's block (leaves without same)
    QI_DATA = 12  # where its data start
    QI_ROOM = Q_INLINE - QI_DATA
    QI_EMPTY = 0
    QI_PACKED = 1
    QI_SPILLED = 2
    QI_CACHED = 1
    QI_HOLDS = 2


cdef struct QView:
    # An inline leaf opened as the current layout with one slot: QState, hashes[1], slot[1] (on the stack).
    QState h
    uint32_t hash
    uint8_t slot[Q_SLOT]


cdef struct QTmp:
    # A record unpacked on the stack: the QGroup header, buf and summary laid out as sp.gsize bytes from &g
    # (buf then summary, sized for the largest caps), then room for the intervals of a packed record.
    QGroup g
    QEntry buf[Q_MAX_REORDER]
    int64_t sum[Q_MAX_PENDING]
    int64_t ivs[2 * Q_TMP_IV]


# A leaf before its first relevant event: the person's block holds NULL where its QState* goes, and
# readers see this one, empty, its cache valid for every instant (so nothing ever writes it).
cdef QState _Q_EMPTY
_Q_EMPTY.tbase = 0
_Q_EMPTY.abase = 0
_Q_EMPTY.session = -1
_Q_EMPTY.c_from = INT64_MIN
_Q_EMPTY.c_until = INT64_MAX  # NO_FLIP
_Q_EMPTY.n = 0
_Q_EMPTY.cap = 0
_Q_EMPTY.c_valid = True
_Q_EMPTY.c_holds = False


cdef inline QState* _qstate(char* block, const LeafSpec* sp, QView* v) noexcept nogil:
    """The leaf's state, to read (_Q_EMPTY before its first relevant event); an inline leaf's opened in v.

    Valid until the leaf's state next changes (a write, or a query that caches its value)."""
    cdef QState* qs
    cdef const uint8_t* p
    if sp.inl:
        p = <const uint8_t*>(block + sp.offset)
        if p[0] == QI_PACKED:
            _qi_open(p, sp, v)
            return &v.h
        if p[0] == QI_SPILLED:
            return _qi_heap(p)
        return &_Q_EMPTY
    qs = (<QState**>(block + sp.offset))[0]
    return qs if qs != NULL else &_Q_EMPTY


cdef QState* _qstate_w(char* block, const LeafSpec* sp, QView* v) except NULL:
    """The leaf's state, to write: allocated (with no slots) at the first need; an inline leaf's opened in
    v (or its spilled QState), to hand back with _q_done after the change."""
    cdef QState** slot = <QState**>(block + sp.offset)
    cdef const uint8_t* p
    if sp.inl:
        p = <const uint8_t*>(block + sp.offset)
        if p[0] == QI_SPILLED:
            return _qi_heap(p)
        _qi_open(p, sp, v)
        return &v.h
    if slot[0] == NULL:
        slot[0] = <QState*>calloc(1, sizeof(QState))
        if slot[0] == NULL:
            raise MemoryError()
        slot[0].session = -1
    return slot[0]


cdef inline int _q_done(char* block, const LeafSpec* sp, QState* qs) except -1:
    """After a change to the state _qstate_w gave: an inline leaf's back into its bytes (qs is stale then)."""
    if sp.inl:
        return _qi_commit(block, sp, qs)
    return 0


cdef inline int64_t* _q_bases(const QState* qs) noexcept nogil:
    return <int64_t*>&qs.tbase  # tbase, abase


cdef inline uint32_t* _q_hashes(const QState* qs) noexcept nogil:
    return <uint32_t*>(<char*>qs + sizeof(QState))


cdef inline uint8_t* _q_slot(const QState* qs, Py_ssize_t g) noexcept nogil:
    return <uint8_t*>(<char*>qs + sizeof(QState) + qs.cap * sizeof(uint32_t) + g * Q_SLOT)


cdef inline QGroup* _q_spilled(const uint8_t* slot) noexcept nogil:
    cdef QGroup* rec
    memcpy(&rec, slot + 1, sizeof(QGroup*))
    return rec


cdef inline QEntry* _qbuf(QGroup* grp) noexcept nogil:
    return <QEntry*>(<char*>grp + sizeof(QGroup))


cdef inline int64_t* _qsum(QGroup* grp, const LeafSpec* sp) noexcept nogil:
    return <int64_t*>(<char*>grp + sizeof(QGroup) + sp.reorder * sizeof(QEntry))


cdef inline bint _q_before(int64_t ts, int64_t code, int64_t ts2, int64_t code2) noexcept nogil:
    # (ts, arrival) order; arrival numbers are unique, so the codes order events of equal ts
    return ts < ts2 or (ts == ts2 and code < code2)


cdef inline int64_t _q_add(int64_t a, int64_t b) noexcept nogil:
    # a + b (b >= 0), saturating: far-off instants must not wrap round
    if a > INT64_MAX - b:
        return INT64_MAX
    return a + b


cdef inline bint _q_within(int64_t later, int64_t earlier, int64_t d) noexcept nogil:
    # later - earlier <= d for later >= earlier, without overflow
    return <uint64_t>later - <uint64_t>earlier <= <uint64_t>d


cdef QState* _q_reserve(char* block, const LeafSpec* sp, QState* qs, int64_t tbase, int64_t abase) except NULL:
    """Room in qs (_qstate_w's) for slot n (up to nvalues), cleared; the bases set when no record is in use.
    The QState may move: the new one (the block points at it; earlier pointers to it and its slots are
    stale). An inline leaf's has its one slot already."""
    cdef Py_ssize_t cap = qs.cap
    cdef QState* q
    if qs.n >= cap:
        if sp.inl:
            raise MemoryError("an inline sequence leaf holds one record")
        cap = min(cap + (cap // 4 if cap >= 4 else 1), sp.nvalues)  # one slot at a time up to 4: records are 64 bytes
        q = <QState*>malloc(sizeof(QState) + cap * (sizeof(uint32_t) + Q_SLOT))
        if q == NULL:
            raise MemoryError()
        memcpy(q, qs, sizeof(QState) + qs.n * sizeof(uint32_t))
        q.cap = <uint16_t>cap
        if qs.n:
            memcpy(_q_slot(q, 0), _q_slot(qs, 0), qs.n * Q_SLOT)
        free(qs)
        (<QState**>(block + sp.offset))[0] = q
        qs = q
    if qs.n == 0:
        qs.tbase = tbase
        qs.abase = abase
    _q_slot(qs, qs.n)[0] = 0
    return qs


cdef int _q_append(QState* qs, const LeafSpec* sp, QGroup* grp) except -1:
    """A new record (unpacked; its key borrowed) as slot qs.n, after _q_reserve."""
    _q_store(qs, sp, qs.n, grp)
    _q_hashes(qs)[qs.n] = _q_hash(grp.key, grp.klen)
    qs.n += 1
    return 0


cdef int _q_iv_room(QGroup* grp) except -1:
    """Room for one more interval: on the heap once the inline or borrowed array is full."""
    cdef Py_ssize_t cap = grp.iv_cap
    cdef int64_t* p
    if grp.n_iv < cap:
        return 0
    if grp.iv_heap or grp.iv == NULL:
        _grow(<void**>&grp.iv, &cap, grp.n_iv + 1, 2 * sizeof(int64_t))
    else:
        cap = 2 * cap if cap >= 4 else 4
        p = <int64_t*>malloc(cap * 2 * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        memcpy(p, grp.iv, grp.n_iv * 2 * sizeof(int64_t))
        grp.iv = p
    grp.iv_heap = 1
    grp.iv_cap = <uint16_t>min(cap, 0xFFFF)
    return 0


cdef int _q_add_iv(QGroup* grp, const LeafSpec* sp, int64_t a) except -1:
    """A final anchor: its membership interval, merged into the last one when they meet."""
    cdef int64_t lo = _q_add(a, sp.within)
    cdef int64_t hi = _q_add(a, sp.window) if sp.scope == SC_WITHIN else INT64_MAX
    if lo >= hi:
        return 0  # within >= window: never a member
    if grp.n_iv and lo <= grp.iv[2 * grp.n_iv - 1]:
        if hi > grp.iv[2 * grp.n_iv - 1]:
            grp.iv[2 * grp.n_iv - 1] = hi
        return 0
    if grp.n_iv >= 0xFFFF:
        raise MemoryError("too many membership intervals for one value")
    _q_iv_room(grp)
    grp.iv[2 * grp.n_iv] = lo
    grp.iv[2 * grp.n_iv + 1] = hi
    grp.n_iv += 1
    return 0


cdef inline void _q_step(const LeafSpec* sp, uint8_t* has, int64_t* s, int64_t ts, int64_t mask) noexcept nogil:
    """One event, later than every one before it, into a SEQUENCE summary (latest start per step)."""
    cdef int i
    for i in range(sp.nsteps - 1, 0, -1):  # downwards: one event fills one step of a match
        if (mask >> i) & 1 and (has[0] >> (i - 1)) & 1 and (sp.within == 0 or _q_within(ts, s[i - 1], sp.within)):
            if not ((has[0] >> i) & 1) or s[i - 1] > s[i]:
                s[i] = s[i - 1]
            has[0] |= <uint8_t>(1 << i)
    if mask & 1:
        if not (has[0] & 1) or ts > s[0]:
            s[0] = ts
        has[0] |= 1


cdef int _q_fold(QGroup* grp, const LeafSpec* sp, int64_t ts, int64_t mask) except -1:
    """buf[0] leaves the buffer: into the summary, in order (cap 3 for ABSENCE)."""
    cdef int64_t* pend
    cdef Py_ssize_t i, k, n
    if sp.kind == KIND_SEQUENCE:
        _q_step(sp, &grp.has, _qsum(grp, sp), ts, mask)
        return 0
    pend = _qsum(grp, sp)
    n = grp.n_pend
    k = 0
    for i in range(n):
        if mask & 2 and _q_within(ts, pend[i], sp.within):
            continue  # a B at most within after the anchor cancels it
        if not _q_within(ts, pend[i], sp.within):
            _q_add_iv(grp, sp, pend[i])  # nothing kept can land in (A, A + within] any more
        else:
            pend[k] = pend[i]
            k += 1
    if mask & 1 and k < sp.npending:
        pend[k] = ts
        k += 1
    grp.n_pend = <uint8_t>k
    return 0


cdef int _q_insert(CompiledState st, const LeafSpec* sp, const uint8_t* key, Py_ssize_t klen, int64_t ts,
                   int64_t mask) except -1:
    """Caps 1 and 2, then the event into its value's buffer (folding the oldest out of a full one)."""
    cdef QView v
    cdef QState* qs = _qstate_w(st.block, sp, &v)
    if not sp.inl:
        return _q_insert_in(st, sp, qs, key, klen, ts, mask)
    try:
        _q_insert_in(st, sp, qs, key, klen, ts, mask)
    finally:
        _qi_commit(st.block, sp, qs)  # (what the insert left, consistent on an error too)
    return 0


cdef int _q_insert_in(CompiledState st, const LeafSpec* sp, QState* qs, const uint8_t* key, Py_ssize_t klen,
                      int64_t ts, int64_t mask) except -1:
    cdef QGroup* grp = NULL
    cdef QEntry* buf
    cdef QTmp t
    cdef Py_ssize_t g = -1, i, n, o, last
    cdef int64_t code = (st.seq << Q_MASK_BITS) | mask, ots, ocode, lts, lcode
    cdef uint32_t h = _q_hash(key, klen)
    cdef uint32_t* hashes
    cdef bint new = False
    if sp.scope == SC_SESSION and qs.session != st.session:
        _q_clear(qs, sp)
        qs.session = st.session
    if qs.n:
        hashes = _q_hashes(qs)
        for i in range(qs.n):
            if hashes[i] == h and _q_key_is(qs, i, key, klen):
                g = i
                break
    if g < 0:
        if qs.n >= sp.nvalues:
            o = 0
            _q_latest(qs, sp, 0, &ots, &ocode)
            for i in range(1, qs.n):
                _q_latest(qs, sp, i, &lts, &lcode)
                if _q_before(lts, lcode, ots, ocode):
                    o, ots, ocode = i, lts, lcode
            if _q_before(ts, code, ots, ocode):
                return 0  # the newcomer is the oldest: forgotten at once
            if _q_slot(qs, o)[0] == Q_SPILLED:
                _q_free_rec(_q_spilled(_q_slot(qs, o)))
            _q_slot(qs, o)[0] = 0  # the newcomer takes its place
            g = o
        else:
            qs = _q_reserve(st.block, sp, qs, ts, st.seq)
            g = qs.n
        _q_fresh(&t, sp, key, klen)
        grp = &t.g
        new = True
    else:
        grp = _q_open(qs, sp, g, &t)
    buf = _qbuf(grp)
    n = grp.n
    if n == sp.reorder:
        if _q_before(ts, code, buf[0].ts, buf[0].code):
            return 0  # too late: reorder later events of its value are remembered (nothing changed)
        try:
            _q_fold(grp, sp, buf[0].ts, buf[0].code & ((1 << Q_MASK_BITS) - 1))
        except BaseException:
            if grp == &t.g:
                _q_drop_tmp(grp)
            raise
        memmove(buf, buf + 1, (n - 1) * sizeof(QEntry))
        n -= 1
    i = n
    while i > 0 and buf[i - 1].ts > ts:  # after equal timestamps: it arrived last
        i -= 1
    memmove(buf + i + 1, buf + i, (n - i) * sizeof(QEntry))
    buf[i].ts = ts
    buf[i].code = code
    grp.n = <uint8_t>(n + 1)
    qs.c_valid = False
    if not new:
        _q_store(qs, sp, g, grp)
        return 0
    try:
        _q_store(qs, sp, g, grp)
    except BaseException:
        if g < qs.n:  # an evicted record's slot, cleared: the last record takes it
            qs.n -= 1
            memcpy(_q_slot(qs, g), _q_slot(qs, qs.n), Q_SLOT)
            _q_hashes(qs)[g] = _q_hashes(qs)[qs.n]
        raise
    _q_hashes(qs)[g] = h
    if g == qs.n:
        qs.n += 1
    return 0


cdef int _q_observe(CompiledEvaluator ev, CompiledState st, tuple plans, int64_t ts, properties) except -1:
    cdef _QPlan plan
    cdef PredicateMatcher f
    cdef dict props = properties if type(properties) is dict else dict(properties)
    cdef int64_t mask
    cdef Py_ssize_t i, k, end, pi, n_plans = len(plans)
    cdef PyObject* pv
    cdef int32_t fid
    cdef uint8_t r
    cdef bint ok
    memset(ev.qfmemo, 0, len(ev.qfilters))
    for i in range(len(ev.qsames)):
        ev.qkoff[i] = -2  # not built yet
    ev.kend = 0
    for pi in range(n_plans):
        plan = <_QPlan>PyTuple_GET_ITEM(plans, pi)
        mask = 0
        for k in range(plan.n):
            ok = True
            for i in range(plan.fstart[k], plan.fstart[k + 1]):
                fid = plan.fids[i]
                r = ev.qfmemo[fid]
                if r == 0:  # a filter several steps or leaves share is tested once per event
                    f = <PredicateMatcher>PyList_GET_ITEM(ev.qfilters, fid)
                    pv = PyDict_GetItem(props, f.property)
                    r = 2 if f.test(None if pv == NULL else <object>pv) else 1
                    ev.qfmemo[fid] = r
                if r == 1:
                    ok = False
                    break
            if ok:
                mask |= plan.bits[k]
        if mask == 0:
            continue
        if plan.same_id < 0:
            _q_insert(st, &ev.specs[plan.j], ev.kbuf, 0, ts, mask)
            continue
        if ev.qkoff[plan.same_id] == -2:  # the value key, once per event per distinct same tuple
            end = _q_key(ev, props, <tuple>PyList_GET_ITEM(ev.qsames, plan.same_id), ev.kend)
            if end < 0:
                ev.qkoff[plan.same_id] = -1
            else:
                ev.qkoff[plan.same_id] = ev.kend
                ev.qklen[plan.same_id] = end - ev.kend
                ev.kend = end
        if ev.qkoff[plan.same_id] < 0:
            continue  # a missing same value never matches
        _q_insert(st, &ev.specs[plan.j], ev.kbuf + ev.qkoff[plan.same_id], ev.qklen[plan.same_id], ts, mask)
    return 0
