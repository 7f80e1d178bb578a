# Sequence and absence leaves (program.SequenceLeaf): bounded state, observe, evaluation.
#
# Included by _evaluator.pyx. The semantics, and the caps that bound the state,
# are _reference_sequences.py's; this is how they are kept in C.
#
# Per person and leaf, a QState in the person's block points at an array of
# *value records*, one per distinct ``same`` value (at most ``values``; one
# record when the leaf has no ``same``), each of sp.gsize bytes:
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
# Bound, per person and leaf: sizeof(QState) + values * (sizeof(QGroup) +
# 16 * reorder + 8 * nsum + key bytes) + 16 bytes per final interval (one for
# SESSION/EVER; for WITHIN at most (window + how far timestamps run ahead of
# the clock) / (window - within) + 1 alive). Nothing grows with the events.
#
# Cost: observe runs each step's filters on events of its model, builds the
# value key, finds the record (a scan of at most ``values`` keys) and inserts
# into buf (at most ``reorder`` moves). A leaf's value is cached with the
# instant it next flips, like a WITHIN leaf's; recomputing it is one pass over
# each record's buf (times the steps) or its intervals.

cdef struct QEntry:
    int64_t ts
    int64_t code  # arrival number << 5 | mask (bit i: the event can fill step i; ABSENCE: 1 A, 2 B)


cdef struct QGroup:
    uint8_t* key  # the value key (NULL when the leaf has no same)
    int64_t* iv  # ABSENCE: final intervals, (lo, hi) pairs, ascending, disjoint
    uint64_t khash  # FNV-1a of the key: the scan for a value compares this first
    int32_t klen
    uint16_t n_iv
    uint16_t iv_cap
    uint8_t n  # buf entries used (>= 1 in a record in use)
    uint8_t has  # SEQUENCE: bit i, summary[i] is set
    uint8_t n_pend  # ABSENCE: pending anchors in summary[0:n_pend]


cdef struct QState:
    # One allocation: uint64_t hashes[cap] (record g's khash, side by side so that the scan for a value
    # reads one cache line), then cap records of sp.gsize bytes; n in use.
    uint64_t* hashes
    char* groups
    int64_t session  # SESSION: the session the records belong to; -1 for none
    int64_t c_from  # the cache: c_holds for c_from <= now < c_until (session end aside)
    int64_t c_until
    int32_t n
    int32_t cap
    uint8_t c_valid
    uint8_t c_holds


cdef enum:
    Q_MASK_BITS = 5  # a mask takes the low 5 bits of QEntry.code: at most 5 steps
    Q_MAX_REORDER = 64
    Q_MAX_VALUES = 4096
    Q_MAX_PENDING = 64


cdef inline QState* _qstate(char* block, const LeafSpec* sp) noexcept nogil:
    return <QState*>(block + sp.offset)


cdef inline QGroup* _qgroup(const QState* qs, const LeafSpec* sp, Py_ssize_t g) noexcept nogil:
    return <QGroup*>(qs.groups + g * sp.gsize)


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


# ---------------------------------------------------------------- spec and plans

cdef int _q_spec(LeafSpec* sp, leaf, Py_ssize_t j) except -1:
    sp.kind = int(leaf.kind)
    sp.scope = int(leaf.scope)
    sp.window = leaf.window_us
    sp.within = leaf.within_us
    sp.nsteps = len(leaf.steps)
    sp.reorder = leaf.reorder
    sp.nvalues = leaf.values
    sp.npending = leaf.pending
    sp.nsame = len(leaf.same)
    sp.model = -1
    if sp.kind != KIND_SEQUENCE and sp.kind != KIND_ABSENCE:
        raise ValueError(f"leaf {j}: unknown sequence kind {leaf.kind!r}")
    if sp.scope < SC_WITHIN or sp.scope > SC_EVER:
        raise ValueError(f"leaf {j}: unknown scope {leaf.scope!r}")
    if sp.kind == KIND_SEQUENCE and not 2 <= sp.nsteps <= Q_MASK_BITS:
        raise ValueError(f"leaf {j}: a sequence has 2 to {Q_MASK_BITS} steps, not {sp.nsteps}")
    if sp.kind == KIND_ABSENCE and sp.nsteps != 2:
        raise ValueError(f"leaf {j}: an absence has 2 steps (A, B), not {sp.nsteps}")
    if sp.within < 0 or (sp.kind == KIND_ABSENCE and sp.within == 0) or (sp.scope == SC_WITHIN and sp.window <= 0):
        raise ValueError(f"leaf {j}: bad within or window")
    if not (1 <= sp.reorder <= Q_MAX_REORDER and 1 <= sp.nvalues <= Q_MAX_VALUES and 1 <= sp.npending <= Q_MAX_PENDING):
        raise ValueError(f"leaf {j}: caps out of range (reorder, values, pending)")
    sp.nsum = sp.nsteps if sp.kind == KIND_SEQUENCE else sp.npending
    sp.gsize = sizeof(QGroup) + sp.reorder * sizeof(QEntry) + sp.nsum * sizeof(int64_t)
    sp.empty_holds = False
    return 0


cdef class _QPlan:
    """What observe needs of one sequence leaf for events of one model: the steps of that model,
    each a bit and a run of filter ids (into the evaluator's distinct sequence filters), and the
    id of the leaf's same properties (into its distinct same tuples; -1 for none). Filters and
    value keys that several leaves share are computed once per event."""

    cdef Py_ssize_t j
    cdef int n
    cdef int64_t* bits
    cdef int32_t* fstart  # step i's filters are fids[fstart[i]:fstart[i + 1]]
    cdef int32_t* fids
    cdef Py_ssize_t same_id

    def __cinit__(self):
        self.bits = NULL
        self.fstart = NULL
        self.fids = NULL

    def __dealloc__(self):
        free(self.bits)
        free(self.fstart)
        free(self.fids)


def _q_plans(Py_ssize_t j, leaf, dict filter_index, list filters, dict same_index):
    """(model, _QPlan) for each model the leaf's steps read; new distinct filters go to ``filters``."""
    cdef _QPlan plan
    cdef Py_ssize_t k, m
    by_model = {}
    for i, step in enumerate(leaf.steps):
        fids = []
        for f in step.filters:
            key = _filter_key(f)
            if key not in filter_index:
                filter_index[key] = len(filters)
                filters.append(PredicateMatcher(f.op, f.values, f.property))
            fids.append(filter_index[key])
        by_model.setdefault(step.model, []).append((1 << i, fids))
    same_id = same_index.setdefault(tuple(leaf.same), len(same_index)) if leaf.same else -1
    out = []
    for model, steps in by_model.items():
        plan = _QPlan()
        plan.j = j
        plan.n = len(steps)
        plan.same_id = same_id
        plan.bits = <int64_t*>calloc(plan.n + 1, sizeof(int64_t))
        plan.fstart = <int32_t*>calloc(plan.n + 1, sizeof(int32_t))
        plan.fids = <int32_t*>calloc(sum(len(f) for _, f in steps) + 1, sizeof(int32_t))
        if plan.bits == NULL or plan.fstart == NULL or plan.fids == NULL:
            raise MemoryError()
        m = 0
        for k, (bit, fids) in enumerate(steps):
            plan.bits[k] = bit
            plan.fstart[k] = <int32_t>m
            for fid in fids:
                plan.fids[m] = fid
                m += 1
        plan.fstart[plan.n] = <int32_t>m
        out.append((model, plan))
    return out


# ---------------------------------------------------------------- state

cdef void _q_clear(QState* qs, const LeafSpec* sp) noexcept nogil:
    cdef Py_ssize_t g
    cdef QGroup* grp
    for g in range(qs.n):
        grp = _qgroup(qs, sp, g)
        free(grp.key)
        free(grp.iv)
    qs.n = 0
    qs.c_valid = False


cdef void _q_free(QState* qs, const LeafSpec* sp) noexcept nogil:
    _q_clear(qs, sp)
    free(qs.hashes)
    qs.groups = NULL
    qs.hashes = NULL
    qs.cap = 0


cdef Py_ssize_t _q_stored(const QState* qs, const LeafSpec* sp) noexcept nogil:
    """Events kept as they are (the reorder buffers) and pending anchors."""
    cdef Py_ssize_t g, total = 0
    cdef QGroup* grp
    for g in range(qs.n):
        grp = _qgroup(qs, sp, g)
        total += grp.n + grp.n_pend
    return total


cdef Py_ssize_t _q_nbytes(const QState* qs, const LeafSpec* sp) noexcept nogil:
    cdef Py_ssize_t g, total = qs.cap * (sp.gsize + sizeof(uint64_t))
    cdef QGroup* grp
    for g in range(qs.n):
        grp = _qgroup(qs, sp, g)
        total += grp.klen + grp.iv_cap * 2 * sizeof(int64_t)
    return total


cdef QGroup* _q_new_group(QState* qs, const LeafSpec* sp) except NULL:
    """A zeroed record at the end (room made as needed, up to nvalues)."""
    cdef Py_ssize_t cap = qs.cap
    cdef QGroup* grp
    cdef char* q
    if qs.n >= cap:
        cap = 1 if cap == 0 else min(2 * cap, sp.nvalues)
        q = <char*>malloc(cap * (sizeof(uint64_t) + sp.gsize))
        if q == NULL:
            raise MemoryError()
        if qs.n:
            memcpy(q, qs.hashes, qs.n * sizeof(uint64_t))
            memcpy(q + cap * sizeof(uint64_t), qs.groups, qs.n * sp.gsize)
        free(qs.hashes)
        qs.hashes = <uint64_t*>q
        qs.groups = q + cap * sizeof(uint64_t)
        qs.cap = <int32_t>cap
    grp = _qgroup(qs, sp, qs.n)
    memset(grp, 0, sp.gsize)
    qs.n += 1
    return grp


cdef inline uint64_t _q_hash(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef int _q_set_key(QGroup* grp, const uint8_t* key, Py_ssize_t klen) except -1:
    grp.key = NULL
    grp.khash = _q_hash(key, klen)
    grp.klen = <int32_t>klen
    if klen:
        grp.key = <uint8_t*>malloc(klen)
        if grp.key == NULL:
            raise MemoryError()
        memcpy(grp.key, key, klen)
    return 0


cdef int _q_add_iv(QGroup* grp, const LeafSpec* sp, int64_t a) except -1:
    """A final anchor: its membership interval, merged into the last one when they meet."""
    cdef int64_t lo = _q_add(a, sp.within)
    cdef int64_t hi = _q_add(a, sp.window) if sp.scope == SC_WITHIN else INT64_MAX
    cdef Py_ssize_t cap = grp.iv_cap
    if lo >= hi:
        return 0  # within >= window: never a member
    if grp.n_iv and lo <= grp.iv[2 * grp.n_iv - 1]:
        if hi > grp.iv[2 * grp.n_iv - 1]:
            grp.iv[2 * grp.n_iv - 1] = hi
        return 0
    if grp.n_iv >= 0xFFFF:
        raise MemoryError("too many membership intervals for one value")
    if grp.n_iv >= cap:
        _grow(<void**>&grp.iv, &cap, grp.n_iv + 1, 2 * sizeof(int64_t))
        grp.iv_cap = <uint16_t>min(cap, 0xFFFF)
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
    cdef QState* qs = _qstate(st.block, sp)
    cdef QGroup* grp = NULL
    cdef QGroup* o
    cdef QEntry* buf
    cdef QEntry* ob
    cdef Py_ssize_t g, i, n
    cdef int64_t code = (st.seq << Q_MASK_BITS) | mask
    cdef uint64_t h = _q_hash(key, klen)
    if sp.scope == SC_SESSION and qs.session != st.session:
        _q_clear(qs, sp)
        qs.session = st.session
    for g in range(qs.n):
        if qs.hashes[g] == h:
            grp = _qgroup(qs, sp, g)
            if grp.klen == klen and (klen == 0 or memcmp(grp.key, key, klen) == 0):
                break
            grp = NULL
    if grp == NULL:
        if qs.n >= sp.nvalues:
            o = _qgroup(qs, sp, 0)
            for g in range(1, qs.n):
                grp = _qgroup(qs, sp, g)
                buf = _qbuf(grp)
                ob = _qbuf(o)
                if _q_before(buf[grp.n - 1].ts, buf[grp.n - 1].code, ob[o.n - 1].ts, ob[o.n - 1].code):
                    o = grp
            ob = _qbuf(o)
            if _q_before(ts, code, ob[o.n - 1].ts, ob[o.n - 1].code):
                return 0  # the newcomer is the oldest: forgotten at once
            free(o.key)
            free(o.iv)
            memset(o, 0, sp.gsize)
            grp = o
        else:
            grp = _q_new_group(qs, sp)
        _q_set_key(grp, key, klen)
        qs.hashes[(<char*>grp - qs.groups) // sp.gsize] = grp.khash
    buf = _qbuf(grp)
    n = grp.n
    if n == sp.reorder:
        if _q_before(ts, code, buf[0].ts, buf[0].code):
            return 0  # too late: reorder later events of its value are remembered
        _q_fold(grp, sp, buf[0].ts, buf[0].code & ((1 << Q_MASK_BITS) - 1))
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
