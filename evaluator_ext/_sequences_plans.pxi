# Sequence and absence leaves: a SequenceLeaf compiled to its LeafSpec and per-model plans (included by
# _evaluator.pyx; the state layout is described in _sequences.pxi).

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
    sp.inl = sp.nsame == 0  # one value record: inline (_sequences.pxi)
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
