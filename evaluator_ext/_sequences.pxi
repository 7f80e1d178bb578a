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


# ---------------------------------------------------------------- evaluation

cdef inline bint _q_session_open(CompiledEvaluator ev, CompiledState st, const QState* qs, int64_t now) noexcept:
    return st.session >= 0 and qs.session == st.session and now < st.session_last_ts + ev.timeout


cdef int _q_compute_sequence(const LeafSpec* sp, QState* qs, int64_t now) except -1:
    cdef Py_ssize_t g, i
    cdef QGroup* grp
    cdef QEntry* buf
    cdef int64_t s[Q_MASK_BITS]
    cdef uint8_t has
    cdef bint found = False
    cdef int64_t best = 0, last = sp.nsteps - 1
    for g in range(qs.n):
        grp = _qgroup(qs, sp, g)
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
    cdef Py_ssize_t g, i, k, m = 0, need = 0
    cdef QGroup* grp
    cdef QEntry* buf
    cdef int64_t* pend
    cdef int64_t a
    for g in range(qs.n):
        grp = _qgroup(qs, sp, g)
        if sp.scope == SC_WITHIN and grp.n_iv and st.horizon != INT64_MIN:
            k = 0  # intervals that ended before the horizon: no later query is inside them
            while k < grp.n_iv and grp.iv[2 * k + 1] <= st.horizon:
                k += 1
            if k:
                memmove(grp.iv, grp.iv + 2 * k, (grp.n_iv - k) * 2 * sizeof(int64_t))
                grp.n_iv = <uint16_t>(grp.n_iv - k)
        need += grp.n_iv + grp.n_pend + grp.n
    if 2 * need + 2 > ev.ivcap:
        _grow(<void**>&ev.ivs, &ev.ivcap, 2 * need + 2, sizeof(int64_t))
    for g in range(qs.n):
        grp = _qgroup(qs, sp, g)
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


cdef int _q_ensure(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now) except -1:
    cdef QState* qs = _qstate(st.block, sp)
    if qs.c_valid and qs.c_from <= now and now < qs.c_until:
        return 0
    if sp.kind == KIND_SEQUENCE:
        return _q_compute_sequence(sp, qs, now)
    return _q_compute_absence(ev, st, sp, qs, now)


cdef int _q_holds(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now) except -1:
    cdef QState* qs = _qstate(st.block, sp)
    if sp.scope == SC_SESSION and not _q_session_open(ev, st, qs, now):
        return False
    _q_ensure(ev, st, sp, now)
    return qs.c_holds


cdef int64_t _q_flip(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now) except? -1:
    cdef QState* qs = _qstate(st.block, sp)
    cdef int64_t end
    if sp.scope == SC_SESSION:
        if not _q_session_open(ev, st, qs, now):
            return NO_FLIP
        _q_ensure(ev, st, sp, now)
        end = st.session_last_ts + ev.timeout
        if qs.c_holds:
            return end  # nothing in a session ends a match or an absence but the session's end
        return qs.c_until if qs.c_until < end else NO_FLIP
    _q_ensure(ev, st, sp, now)
    return qs.c_until


cdef bint _q_in_scope(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, const QState* qs, int64_t ts,
                      int64_t now) noexcept:
    if sp.scope == SC_WITHIN:
        return now < _q_add(ts, sp.window)
    if sp.scope == SC_SESSION:
        return _q_session_open(ev, st, qs, now)
    return True


cdef object _q_progress(CompiledEvaluator ev, CompiledState st, const LeafSpec* sp, int64_t now):
    """reference._sequence_at / _absence_at from the bounded state: a SequenceProgress."""
    cdef QState* qs = _qstate(st.block, sp)
    cdef Py_ssize_t g, i, k
    cdef QGroup* grp
    cdef QGroup* found = NULL
    cdef QEntry* buf
    cdef int64_t s[Q_MASK_BITS]
    cdef int64_t* pend
    cdef uint8_t has
    cdef int depth, best_depth = 0
    cdef int64_t best_ts = 0, a
    if _q_holds(ev, st, sp, now):
        if sp.kind == KIND_ABSENCE:
            return SequenceProgress(2, None, ())
    for g in range(qs.n):
        grp = _qgroup(qs, sp, g)
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
                            a == best_ts and found != NULL and _q_latest_after(grp, found))))):
                        best_depth, best_ts, found = depth, a, grp
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
                if found == NULL or a < best_ts or (a == best_ts and _q_latest_after(grp, found)):
                    best_depth, best_ts, found = 1, a, grp
    if found == NULL:
        return SequenceProgress(0, None, ())
    return SequenceProgress(best_depth, best_ts, _q_key_values(found.key, found.klen))


cdef inline bint _q_latest_after(QGroup* a, QGroup* b) noexcept nogil:
    """Whether value a's latest remembered event is after value b's."""
    cdef QEntry* x = _qbuf(a)
    cdef QEntry* y = _qbuf(b)
    return _q_before(y[b.n - 1].ts, y[b.n - 1].code, x[a.n - 1].ts, x[a.n - 1].code)


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
    cdef QState* qs = _qstate(st.block, sp)
    cdef QState* ds = _qstate(dn.block, dp)
    cdef QGroup* grp
    cdef QGroup* dg
    cdef QEntry* buf
    cdef Py_ssize_t g, i
    cdef int64_t shift = st.seq - dn.seq, seq
    if (sp.kind != dp.kind or sp.scope != dp.scope or sp.nsteps != dp.nsteps or sp.within != dp.within
            or sp.reorder != dp.reorder or sp.nvalues != dp.nvalues or sp.nsame != dp.nsame
            or (sp.kind == KIND_ABSENCE and sp.npending != dp.npending)
            or (sp.scope == SC_WITHIN and sp.window != dp.window)):
        raise ValueError("graft: the two leaves keep different state")
    _q_clear(qs, sp)
    qs.session = -1
    if sp.scope == SC_SESSION:
        if not (same_session and ds.session == dn.session):
            return 0
        qs.session = st.session
    for g in range(ds.n):
        dg = _qgroup(ds, dp, g)
        grp = _q_new_group(qs, sp)
        memcpy(grp, dg, sp.gsize)
        grp.key = NULL
        grp.iv = NULL
        grp.n_iv = 0
        grp.iv_cap = 0
        _q_set_key(grp, dg.key, dg.klen)
        qs.hashes[g] = grp.khash
        for i in range(dg.n_iv):
            _q_add_iv_raw(grp, dg.iv[2 * i], dg.iv[2 * i + 1])
        buf = _qbuf(grp)
        for i in range(grp.n):
            seq = (buf[i].code >> Q_MASK_BITS) + shift
            buf[i].code = ((seq if seq >= 1 else 1) << Q_MASK_BITS) | (buf[i].code & ((1 << Q_MASK_BITS) - 1))
    qs.c_valid = False
    return 0
