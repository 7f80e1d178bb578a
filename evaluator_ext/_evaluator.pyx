# cython: language_level=3
"""The compiled hot path: the event-leaf evaluator and the predicate kernels.

Every function takes integers, plain values and buffers (memoryviews into
LMDB, numpy arrays) and returns plain values; nothing here knows about gRPC or
LMDB. The only Python module it imports is ``program`` (the IR and its
enums): the reference is the specification this module is tested against,
so it must not also be a part of it.

``CompiledEvaluator`` runs a ``Program`` (see program.py) with the semantics
of ``reference.ReferenceEvaluator`` (same results, same interface) but keeps,
per person and event leaf, only what the leaf can still observe, in one C
block per person laid out once per program:

- WITHIN + COUNT: the ``keep`` (= int(threshold) + 1) largest matching
  timestamps not yet out of every window, ascending. ``min(count, keep)``
  decides the comparison now and at every later instant, and only their
  ``ts + window`` can flip it.
- WITHIN + SUM/MIN/MAX/AVG: (ts, value, arrival number) of the matching
  events still inside the window, ascending by ts.
- SESSION: count (and n_values, min, max or an exact sum, as the aggregation
  needs) of the matching events of the session they belong to; reset when the
  person's session moves on.
- EVER: the same, never reset.

- SEQUENCE / ABSENCE (program.SequenceLeaf, issue 15): per ``same`` value,
  a reorder buffer of the latest events and a summary of the older ones
  folded in order (the latest start per step; pending anchors and merged
  membership intervals). _sequences.pxi has the layout, the bound and the
  cost, _sequences_eval.pxi the evaluation, _sequences_codec.pxi the
  section format.

Per person: the current session's number, id and latest timestamp (sessions
are decided in arrival order across all models, as in the reference), an
arrival counter, and ``horizon``, the largest ``now`` ever passed to
``evaluate``/``next_change``/``leaf``. Window state is pruned relative to the
horizon, so "now" must not go backwards for a person (the server clock does
not): a query at an instant earlier than a previous one may miss events that
were pruned. Events too old for any window from the horizon on are not kept.

Exact sums. The reference sums with ``math.fsum``, whose result is the
correctly rounded exact sum. SESSION and EVER keep the state of CPython's own
fsum loop (Shewchuk's non-overlapping partials, in practice one to three
doubles, plus the inf/nan accumulators) and finish with CPython's rounding
tail, so the value is bit-identical to ``math.fsum`` over the same values.
WITHIN sums run the same code over the kept values. Where ``math.fsum``
raises (intermediate overflow of finite values, ``inf + -inf``, an int too
large for a double) the reference evaluator raises; this one answers what
IEEE arithmetic would (±inf, nan) instead of failing the person's evaluation.
MIN/MAX follow Python's ``min``/``max`` over arrival order, NaN included (a
NaN first in arrival order wins, later NaNs are skipped).

Cost. A WITHIN leaf's value is constant from the instant it was computed
until its ``flips_at``: it is recomputed only when an event changes its state
or when that instant passes, in one pass over what it keeps (COUNT: at most
``keep`` timestamps; aggregates: the events in the window). SESSION and EVER
leaves cost O(1). Filters run once per event, at ``observe``, on the leaves of
the event's model only.

Persisted state (``dump``/``load``, issue 11). A person's state is written to
LMDB beside the events that changed it, so a restart reads it instead of
replaying the log. Layout, little-endian; uv is an unsigned LEB128 varint, zz
a zigzag varint, f64 a raw IEEE double, u64 8 raw bytes:

    u8   version (1; the reference's dumps begin with 0xF1, so neither
         evaluator takes the other's bytes for its own)
    uv   session + 1 (0: no session yet)
    uv   len, then the session id in UTF-8
    zz   session's last ts     (the base B of the relative timestamps below)
    uv   arrival counter
    zz   horizon - B           (differences mod 2**64: exact for any int64)
    uv   number of sections, then per distinct leaf state of the program:
         u64 key  uv len  payload[len]            (len 0: the leaf is empty)
    u32  CRC-32 (zlib's) of everything before it

Payloads, by the leaf's kind:
- WITHIN COUNT: uv n, zz (ts0 - B), uv deltas: the kept timestamps (at most
  ``keep``) still inside the window from the horizon on.
- WITHIN SUM/MIN/MAX/AVG: uv n, then per event: the ts as above, uv the
  arrival word (arrival * 4 + 2 int beyond a double + 1 has a value), f64
  the value if it has one.
- SESSION/EVER: uv count, and for aggregates uv n_values, then MIN/MAX: f64
  min, f64 max; SUM/AVG: u8 flags (1 failed, 2 has non-finite sums), f64 the
  left-to-right sum, uv n, f64 partials[n], and with flag 2 f64 special, f64
  inf. SESSION counts only the current session (a leaf counting a finished
  one is written empty), so it carries no session number.

Keys. A section's key is the first 8 bytes of BLAKE2b over
``program.state_key(leaf)``: the leaf's identity as far as its state goes
(model, filters, scope, window, the aggregate's family and property, keep).
Leaves with equal keys share a section; bytes dumped under another program
restore the leaves whose key both have, skip the sections of leaves this
program lacks (the length prefix makes that possible without knowing them)
and start the others empty: ``missing_leaves``/``load_with_missing`` name
them. The key costs 8 bytes per leaf state, empty ones included: the price of
bytes that describe themselves, so that a reload after a program change needs
nothing but the bytes and missing_leaves is exact (an empty leaf is present,
not missing). A layout table stored once per program, by fingerprint, would
bring an empty leaf down to one byte; it needs the engine to keep the table.

Cost. No per-event overhead beyond what the state keeps: a kept timestamp is
a delta varint (1-4 bytes at second-scale gaps), an aggregate's event adds
its arrival word and its value. Caches (the WITHIN value and its validity)
are not written; they are recomputed on the first query. Pruned-but-kept
window entries (older than the horizon allows) are not written either, so a
dump is the same whichever queries came before it. Same program: section i is
distinct key i, found without a lookup. At 60 leaves (26 distinct states) a
dump costs about 2.6 us and a load about 4.2 us (bench in the commit log).
Load checks the checksum, then bounds every read: corrupt input or an unknown
version raises ValueError, never a half-read state.

Predicates. ``PredicateMatcher`` is the one compiled implementation of
``reference.matches_predicate``: the evaluator's leaf filters, the domain's
event-model filters (``FilterSet``, one per model, run on every ingested
event), explanations and the words of warehouse string columns all run the
same ``test``. It is built once, so the per-value cost is a type check and a
comparison: IN / NOT_IN over str/int/float/bool literals (no NaN) are frozenset
lookups, with booleans in a set of their own because ``True == 1``.
"""

from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBuffer_Release, PyObject_CheckBuffer,
                             PyObject_GetBuffer)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.object cimport PyObject
from libc.math cimport INFINITY, NAN, fabs, floor, isfinite, isinf, isnan
from libc.stdint cimport INT64_MAX, INT64_MIN, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

cimport cython

from . import program as _program
from .program import LeafValue, SequenceLeaf, SequenceProgress, state_key_hash


# The numbers of program.Op, Scope, Aggregation, Comparison and Code (checked at import, below).
cdef enum:
    OP_EQ = 1
    OP_NE = 2
    OP_LT = 3
    OP_LE = 4
    OP_GT = 5
    OP_GE = 6
    OP_IN = 7
    OP_NOT_IN = 8
    OP_BETWEEN = 9
    OP_CONTAINS = 10
    OP_STARTS_WITH = 11
    OP_IS_SET = 12
    OP_IS_NOT_SET = 13

cdef enum:
    SC_WITHIN = 1
    SC_SESSION = 2
    SC_EVER = 3

cdef enum:
    AG_COUNT = 1
    AG_SUM = 2
    AG_MIN = 3
    AG_MAX = 4
    AG_AVG = 5

cdef enum:
    CMP_EQ = 1
    CMP_NE = 2
    CMP_LT = 3
    CMP_LE = 4
    CMP_GT = 5
    CMP_GE = 6

cdef enum:
    KIND_EVENT = 0  # LeafSpec.kind of an EventLeaf; the others are program.Kind's
    KIND_SEQUENCE = 1
    KIND_ABSENCE = 2

cdef enum:
    CODE_STATIC = 1
    CODE_EVENT = 2
    CODE_AND = 3
    CODE_OR = 4
    CODE_NOT = 5

# The C enums above by program.py's names. A C enum cannot be generated from a
# Python IntEnum, so the two are tied here instead: importing a module whose
# numbers disagree with program.py fails, rather than evaluating one operator
# as another. tests/test_vocabulary.py ties program.py to the protos.
ENUMS = {
    "Op": {"EQ": OP_EQ, "NE": OP_NE, "LT": OP_LT, "LE": OP_LE, "GT": OP_GT, "GE": OP_GE, "IN": OP_IN,
           "NOT_IN": OP_NOT_IN, "BETWEEN": OP_BETWEEN, "CONTAINS": OP_CONTAINS, "STARTS_WITH": OP_STARTS_WITH,
           "IS_SET": OP_IS_SET, "IS_NOT_SET": OP_IS_NOT_SET},
    "Scope": {"WITHIN": SC_WITHIN, "SESSION": SC_SESSION, "EVER": SC_EVER},
    "Aggregation": {"COUNT": AG_COUNT, "SUM": AG_SUM, "MIN": AG_MIN, "MAX": AG_MAX, "AVG": AG_AVG},
    "Comparison": {"EQ": CMP_EQ, "NE": CMP_NE, "LT": CMP_LT, "LE": CMP_LE, "GT": CMP_GT, "GE": CMP_GE},
    "Code": {"STATIC": CODE_STATIC, "EVENT": CODE_EVENT, "AND": CODE_AND, "OR": CODE_OR, "NOT": CODE_NOT},
    "Kind": {"SEQUENCE": KIND_SEQUENCE, "ABSENCE": KIND_ABSENCE},
}


def _check_enums():
    for name, numbers in ENUMS.items():
        python = {m.name: int(m) for m in getattr(_program, name)}
        if python != numbers:
            raise ImportError(f"qualify.evaluator._evaluator: its {name} numbers {numbers} "
                              f"are not program.{name}'s {python}; rebuild the extension")


_check_enums()

# A WITHIN COUNT threshold this large keeps every timestamp in the window.
cdef int64_t KEEP_ALL = INT64_MAX
cdef int64_t NO_FLIP = INT64_MAX


# ---------------------------------------------------------------- exact sums

cdef struct WEntry:
    # One event a WITHIN aggregate keeps.
    int64_t ts
    int64_t seq  # arrival number * 4 + 2 if the value is an int beyond a double + 1 if it has a value
    double v


cdef struct FSum:
    # CPython math.fsum's running state: non-overlapping partials, ascending
    # magnitude, plus the sums of the non-finite summands.
    double* p
    Py_ssize_t n
    Py_ssize_t cap
    double special
    double inf
    # Where math.fsum raises (intermediate overflow, inf + -inf, an int beyond a
    # double) reference.exact_sum answers the left-to-right float sum instead.
    double naive
    bint failed


cdef int _grow(void** p, Py_ssize_t* cap, Py_ssize_t need, size_t size) except -1:
    cdef Py_ssize_t c = cap[0]
    cdef void* q
    if need <= c:
        return 0
    if c < 4:
        c = 4
    while c < need:
        c *= 2
    q = realloc(p[0], c * size)
    if q == NULL:
        raise MemoryError()
    p[0] = q
    cap[0] = c
    return 0


cdef inline void _fsum_reset(FSum* s) noexcept nogil:
    s.n = 0
    s.special = 0.0
    s.inf = 0.0
    s.naive = 0.0
    s.failed = False


cdef int _fsum_add(FSum* s, double x, bint huge) except -1:
    """One iteration of CPython's fsum loop (Modules/mathmodule.c).

    ``huge``: x stands for an int beyond a double (x is then ±inf), on which
    math.fsum raises.
    """
    cdef double xsave = x, y, t, hi, lo, yr
    cdef Py_ssize_t i = 0, j
    s.naive += x
    if huge:
        s.failed = True
    for j in range(s.n):
        y = s.p[j]
        if fabs(x) < fabs(y):
            t = x
            x = y
            y = t
        hi = x + y
        yr = hi - x
        lo = y - yr
        if lo != 0.0:
            s.p[i] = lo
            i += 1
        x = hi
    s.n = i
    if x != 0.0:
        if not isfinite(x):
            if isfinite(xsave):
                s.failed = True  # CPython raises OverflowError("intermediate overflow in fsum")
            else:
                if isinf(xsave):
                    s.inf += xsave
                s.special += xsave
            s.n = 0
        else:
            if s.n >= s.cap:
                _grow(<void**>&s.p, &s.cap, s.n + 1, sizeof(double))
            s.p[s.n] = x
            s.n += 1
    return 0


cdef inline bint _fsum_raises(const FSum* s) noexcept nogil:
    # CPython raises ValueError("-inf + inf in fsum") when the infinities cancel.
    return s.failed or (s.special != 0.0 and isnan(s.inf))


cdef double _fsum_value(const FSum* s) noexcept nogil:
    """reference.exact_sum: CPython fsum's tail (the partials added from the top, then
    the half-even fix), or the left-to-right sum where math.fsum raises."""
    cdef Py_ssize_t n = s.n
    cdef double hi = 0.0, lo = 0.0, x, y, yr
    if _fsum_raises(s):
        return s.naive
    if s.special != 0.0:
        return s.special
    if n > 0:
        n -= 1
        hi = s.p[n]
        while n > 0:
            x = hi
            n -= 1
            y = s.p[n]
            hi = x + y
            yr = hi - x
            lo = y - yr
            if lo != 0.0:
                break
        if n > 0 and ((lo < 0.0 and s.p[n - 1] < 0.0) or (lo > 0.0 and s.p[n - 1] > 0.0)):
            y = lo * 2.0
            x = hi + y
            yr = x - hi
            if y == yr:
                hi = x
    return hi


def _fsum(values):
    """reference.exact_sum through the evaluator's incremental code (for tests)."""
    cdef FSum s
    cdef bint huge = False
    cdef double x
    s.p = NULL
    s.cap = 0
    _fsum_reset(&s)
    try:
        for v in values:
            x = _as_double(v, &huge)
            _fsum_add(&s, x, huge)
        return _fsum_value(&s)
    finally:
        free(s.p)


cdef int _by_arrival(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const WEntry*>a).seq, y = (<const WEntry*>b).seq
    return (x > y) - (x < y)


cdef double _exact_sum_by_arrival(const WEntry* e, Py_ssize_t n) except? -1.0:
    """reference.exact_sum of the values of e[0:n] taken in arrival order.

    Only needed when the order matters: where math.fsum overflows (whether it
    does, and the left-to-right fallback, depend on the order of the values).
    """
    cdef WEntry* t = <WEntry*>malloc((n if n > 0 else 1) * sizeof(WEntry))
    cdef Py_ssize_t i, k = 0
    cdef FSum s
    cdef double total
    if t == NULL:
        raise MemoryError()
    s.p = NULL
    s.cap = 0
    _fsum_reset(&s)
    try:
        for i in range(n):
            if e[i].seq & 1:
                t[k] = e[i]
                k += 1
        qsort(t, k, sizeof(WEntry), _by_arrival)
        for i in range(k):
            _fsum_add(&s, t[i].v, (t[i].seq & 2) != 0)
        total = _fsum_value(&s)
    finally:
        free(t)
        free(s.p)
    return total


# ---------------------------------------------------------------- predicates

cdef inline bint _is_number(object x) noexcept:
    return (isinstance(x, int) or isinstance(x, float)) and type(x) is not bool


cdef inline bint _is_str(object x) noexcept:
    return isinstance(x, str)


cdef double _as_double(object v, bint* huge) except? -1.0:
    """A number property as the double ``float(v)`` gives; ints too large become ±inf (huge)."""
    huge[0] = False
    if type(v) is float:
        return PyFloat_AS_DOUBLE(v)
    try:
        return float(v)
    except OverflowError:
        huge[0] = True
        return INFINITY if v > 0 else -INFINITY


cdef inline bint _eq(object v, object a) except -1:
    # bool cannot be subclassed, and booleans equal only booleans.
    if type(v) is bool or type(a) is bool:
        return type(v) is bool and type(a) is bool and v is a
    return v == a


cdef inline bint _ordered(object v, object a) noexcept:
    return (_is_number(v) and _is_number(a)) or (_is_str(v) and _is_str(a))


cdef class PredicateMatcher:
    """``op values`` compiled once, tested on many values (None: missing).

    The one production implementation of predicate semantics on single values
    (event-leaf filters, event-model filters, explain, the words of a
    warehouse string column); tests hold it to reference.matches_predicate.
    ``property`` is carried for error messages and the evaluator's lookups.
    """

    cdef readonly object property
    cdef Py_ssize_t pidx  # the property's index in the evaluator's per-event lookups
    cdef int op
    cdef tuple values
    cdef object a
    cdef object b
    cdef frozenset bools   # IN / NOT_IN fast path: the boolean values
    cdef frozenset others  # ... and the others; None when a linear scan is needed

    def __init__(self, op, values=(), property=""):
        self.property = property
        self.op = int(op)
        self.values = tuple(values)
        if self.op < OP_EQ or self.op > OP_IS_NOT_SET:
            raise ValueError(f"unknown filter operator {op!r}")
        need = 2 if self.op == OP_BETWEEN else (0 if self.op in (OP_IN, OP_NOT_IN, OP_IS_SET, OP_IS_NOT_SET) else 1)
        if len(self.values) < need:
            raise ValueError(f"filter on {self.property!r}: operator {op!r} needs {need} value(s)")
        self.a = self.values[0] if self.values else None
        self.b = self.values[1] if len(self.values) > 1 else None
        self.bools = None
        self.others = None
        if self.op in (OP_IN, OP_NOT_IN) and all(
                type(x) in (str, int, float, bool) and not (type(x) is float and x != x) for x in self.values):
            # Sets agree with _eq here: numbers hash by value (1 == 1.0), no
            # NaN can match by identity, and booleans are kept apart.
            self.bools = frozenset(x for x in self.values if type(x) is bool)
            self.others = frozenset(x for x in self.values if type(x) is not bool)

    cdef bint _member(self, object v) except -1:
        cdef object t = type(v)
        if self.others is not None:
            if t is bool:
                return v in self.bools
            if t is str or t is int or t is float:
                return v in self.others
        for x in self.values:
            if _eq(v, x):
                return True
        return False

    cdef bint test(self, object v) except -1:
        cdef int op = self.op
        cdef object a
        if v is None:
            return op == OP_IS_NOT_SET or op == OP_NE or op == OP_NOT_IN
        if op == OP_IS_SET:
            return True
        if op == OP_IS_NOT_SET:
            return False
        if op == OP_IN:
            return self._member(v)
        if op == OP_NOT_IN:
            return not self._member(v)
        a = self.a
        if op == OP_EQ:
            return _eq(v, a)
        if op == OP_NE:
            return not _eq(v, a)
        if op == OP_CONTAINS:
            return _is_str(v) and _is_str(a) and a in v
        if op == OP_STARTS_WITH:
            return _is_str(v) and _is_str(a) and v.startswith(a)
        if op == OP_BETWEEN:
            return _ordered(v, a) and _ordered(v, self.b) and a <= v and v <= self.b
        if not _ordered(v, a):
            return False
        if op == OP_LT:
            return v < a
        if op == OP_LE:
            return v <= a
        if op == OP_GT:
            return v > a
        return v >= a

    def matches(self, value):
        """Whether ``value`` (None: missing) satisfies the predicate."""
        return self.test(value)

    def table(self, values):
        """``matches`` over a sequence, as bytes of 0/1 (numpy reads them without a copy)."""
        cdef Py_ssize_t i, n = len(values)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef char* p = PyBytes_AS_STRING(out)
        for i in range(n):
            p[i] = 1 if self.test(values[i]) else 0
        return out

    def __repr__(self):
        return f"PredicateMatcher({self.op}, {self.values!r}, {self.property!r})"


cdef class FilterSet:
    """A conjunction of ``property op values`` over one event's properties.

    Compiled once per event model; ``matches`` runs per ingested event, so it
    does the dict lookups and tests in C with no per-filter Python call. A
    property that is absent or None is missing, as ``dict.get`` gives it to
    reference.matches_predicate.
    """

    cdef tuple names
    cdef tuple matchers
    cdef Py_ssize_t n

    def __init__(self, filters):
        """``filters``: (property, op, values) triples; none at all matches everything."""
        matchers = [PredicateMatcher(op, values, prop) for prop, op, values in filters]
        self.matchers = tuple(matchers)
        self.names = tuple(m.property for m in matchers)
        self.n = len(matchers)

    def __len__(self):
        return self.n

    def matches(self, properties):
        """Whether every filter holds on ``properties`` (a mapping of name to value)."""
        cdef dict props = properties if type(properties) is dict else dict(properties)
        cdef PyObject* v
        cdef Py_ssize_t i
        for i in range(self.n):
            v = PyDict_GetItem(props, <object>PyTuple_GET_ITEM(self.names, i))
            if not (<PredicateMatcher>PyTuple_GET_ITEM(self.matchers, i)).test(None if v == NULL else <object>v):
                return False
        return True


def match_predicate(op, values, value):
    """Whether ``value`` (None: missing) satisfies ``op values``: a PredicateMatcher used once."""
    return PredicateMatcher(op, values).test(value)


def compare_value(comparison, value, double threshold):
    """A count or aggregate (None: missing) against a threshold; a missing one satisfies only NE."""
    cdef int c = int(comparison)
    if c < CMP_EQ or c > CMP_GE:
        raise ValueError(f"unknown comparison {comparison!r}")
    if value is None:
        return c == CMP_NE
    return _compare(c, float(value), threshold)


cdef class _LeafPlan:
    """What observe needs of one event leaf: indices into the evaluator's distinct
    filters and properties, which an event computes at most once each."""

    cdef Py_ssize_t j
    cdef int32_t* filters
    cdef Py_ssize_t n_filters
    cdef Py_ssize_t prop  # the aggregated property's index; -1 for COUNT or no property

    def __cinit__(self):
        self.filters = NULL
        self.n_filters = 0
        self.prop = -1

    def __dealloc__(self):
        free(self.filters)


def _filter_key(f) -> tuple:
    # Values by kind as well as by value: (1,) == (True,) == (1.0,) for tuples, not for filters.
    return (f.property, int(f.op), tuple((type(v), v) for v in f.values))


# ---------------------------------------------------------------- state

cdef struct LeafSpec:
    int64_t model
    int scope
    int agg
    int cmp
    int64_t window
    int64_t keep
    double threshold
    bint empty_holds  # the comparison's value with no events in scope
    Py_ssize_t offset  # of the leaf's WState or SState (a QState* for sequences) in a person's state block
    # Sequence and absence leaves (kind != KIND_EVENT; see _sequences.pxi); 0 for the others.
    int kind
    int nsteps
    int64_t within
    int32_t reorder
    int32_t nvalues
    int32_t npending
    int32_t nsame
    int32_t nsum  # int64 summary slots per value: SEQUENCE one per step, ABSENCE npending
    Py_ssize_t gsize  # bytes of one value's record
    bint inl  # no same: the leaf's state lives inline in Q_INLINE bytes of the block (_sequences.pxi)


cdef struct WState:
    # A WITHIN leaf: buf is int64_t[cap] (COUNT: the kept timestamps) or WEntry[cap]
    # (aggregates), n used, ascending by ts. Its holds is c_holds for c_from <= now < c_until.
    void* buf
    int64_t c_from
    int64_t c_until
    int32_t n
    int32_t cap
    uint8_t c_valid
    uint8_t c_holds


cdef struct SState:
    # A SESSION or EVER leaf. Only a prefix is allocated: COUNT needs count and session,
    # MIN/MAX up to vmax, SUM/AVG everything.
    int64_t count
    int64_t session  # SESSION: the session counted, -1 for none
    int64_t n_values
    double vmin
    double vmax
    FSum sum


cdef inline WState* _wstate(char* block, const LeafSpec* sp) noexcept nogil:
    return <WState*>(block + sp.offset)


cdef inline SState* _sstate(char* block, const LeafSpec* sp) noexcept nogil:
    return <SState*>(block + sp.offset)


# Not tracked by the cyclic collector: a state refers only to its evaluator
# (which never refers to a state) and a str, so it cannot be in a cycle, and
# a process holds one per person: tracked, they made every full collection
# scan them all (110-180 ms with 100,000 people loaded).
@cython.no_gc
cdef class CompiledState:
    """One person's realtime state: one C block laid out by its CompiledEvaluator.

    Made by ``CompiledEvaluator.new_state()``; only that evaluator can use it.
    """

    cdef object owner  # the evaluator: keeps specs alive
    cdef const LeafSpec* specs
    cdef Py_ssize_t n_leaves
    cdef Py_ssize_t size
    cdef char* block
    cdef int64_t session
    cdef object session_id
    cdef int64_t session_last_ts
    cdef int64_t seq
    cdef int64_t horizon

    def __cinit__(self):
        self.owner = None
        self.specs = NULL
        self.n_leaves = 0
        self.size = 0
        self.block = NULL
        self.session = -1
        self.session_id = ""
        self.session_last_ts = 0
        self.seq = 0
        self.horizon = INT64_MIN

    def __dealloc__(self):
        cdef Py_ssize_t j
        cdef const LeafSpec* sp
        if self.block == NULL:
            return
        for j in range(self.n_leaves):
            sp = &self.specs[j]
            if sp.kind != KIND_EVENT:
                _q_free(self.block, sp)
            elif sp.scope == SC_WITHIN:
                free(_wstate(self.block, sp).buf)
            elif sp.agg == AG_SUM or sp.agg == AG_AVG:
                free(_sstate(self.block, sp).sum.p)
        free(self.block)

    @property
    def session_number(self):
        """The current session's number (-1 before the first event)."""
        return self.session

    def stored(self, Py_ssize_t j):
        """How many events leaf j keeps (timestamps or (ts, value) pairs; 0 for SESSION/EVER)."""
        if j < 0 or j >= self.n_leaves:
            raise IndexError("event leaf index out of range")
        cdef QView v
        if self.specs[j].kind != KIND_EVENT:
            return _q_stored(_qstate(self.block, &self.specs[j], &v), &self.specs[j])
        if self.specs[j].scope != SC_WITHIN:
            return 0
        return _wstate(self.block, &self.specs[j]).n

    def spilled(self, Py_ssize_t j):
        """Sequence leaf j's value records: (in use, spilled out of their packed place, payload bytes of the
        packed ones); see _sequences.pxi. A leaf without same: its one record's place is inline, its
        payload the inline data (prefix and record, not the cache); spilled, it is on the heap."""
        cdef QState* qs
        cdef QView v
        cdef const uint8_t* p
        cdef Py_ssize_t g, k = 0, payload = 0
        if j < 0 or j >= self.n_leaves or self.specs[j].kind == KIND_EVENT:
            raise IndexError("sequence leaf index out of range")
        if self.specs[j].inl:
            p = <const uint8_t*>(self.block + self.specs[j].offset)
            if p[0] == QI_PACKED:
                return 1, 0, p[2]
            return (1, 1, 0) if p[0] == QI_SPILLED and _qi_heap(p).n else (0, 0, 0)
        qs = _qstate(self.block, &self.specs[j], &v)
        for g in range(qs.n):
            if _q_slot(qs, g)[0] == Q_SPILLED:
                k += 1
            else:
                payload += _q_slot(qs, g)[0]
        return qs.n, k, payload

    def layout(self, Py_ssize_t j):
        """Where sequence leaf j's state is: "empty" (no record), "inline" (a leaf without same, its record
        in its 64 bytes of the block), "spilled" (a leaf without same whose record did not fit: on the
        heap) or "slots" (a leaf with same: its QState and slots); see _sequences.pxi."""
        cdef const uint8_t* p
        cdef QView v
        if j < 0 or j >= self.n_leaves or self.specs[j].kind == KIND_EVENT:
            raise IndexError("sequence leaf index out of range")
        if self.specs[j].inl:
            p = <const uint8_t*>(self.block + self.specs[j].offset)
            return "inline" if p[0] == QI_PACKED else "spilled" if p[0] == QI_SPILLED else "empty"
        return "slots" if _qstate(self.block, &self.specs[j], &v).n else "empty"

    def leaf_nbytes(self, Py_ssize_t j):
        """Bytes sequence leaf j holds for this person: its place in the block (64 inline, 8 a pointer) and
        what it holds beyond (capacity included, as nbytes counts it)."""
        cdef const LeafSpec* sp
        if j < 0 or j >= self.n_leaves or self.specs[j].kind == KIND_EVENT:
            raise IndexError("sequence leaf index out of range")
        sp = &self.specs[j]
        return (Q_INLINE if sp.inl else sizeof(QState*)) + _q_leaf_nbytes(self.block, sp)

    def nbytes(self):
        """Bytes this state holds in C: the block and the buffers it points to (capacity)."""
        cdef Py_ssize_t j, total = self.size
        cdef const LeafSpec* sp
        cdef WState* w
        for j in range(self.n_leaves):
            sp = &self.specs[j]
            if sp.kind != KIND_EVENT:
                total += _q_leaf_nbytes(self.block, sp)
            elif sp.scope == SC_WITHIN:
                w = _wstate(self.block, sp)
                total += w.cap * (sizeof(int64_t) if sp.agg == AG_COUNT else sizeof(WEntry))
            elif sp.agg == AG_SUM or sp.agg == AG_AVG:
                total += _sstate(self.block, sp).sum.cap * sizeof(double)
        return total


cdef inline bint _compare(int c, double v, double t) noexcept nogil:
    if c == CMP_EQ:
        return v == t
    if c == CMP_NE:
        return v != t
    if c == CMP_LT:
        return v < t
    if c == CMP_LE:
        return v <= t
    if c == CMP_GT:
        return v > t
    return v >= t


cdef inline bint _value_holds(const LeafSpec* sp, bint has, double v) noexcept nogil:
    # A missing aggregate satisfies only NE.
    if not has:
        return sp.cmp == CMP_NE
    return _compare(sp.cmp, v, sp.threshold)


cdef bint _scalar_value(const LeafSpec* sp, const SState* ss, double* out) noexcept nogil:
    """SESSION/EVER aggregate; False when missing."""
    if sp.agg == AG_COUNT:
        out[0] = <double>ss.count
        return True
    if ss.n_values == 0:
        return False
    if sp.agg == AG_SUM:
        out[0] = _fsum_value(&ss.sum)
    elif sp.agg == AG_MIN:
        out[0] = ss.vmin
    elif sp.agg == AG_MAX:
        out[0] = ss.vmax
    else:
        out[0] = _fsum_value(&ss.sum) / <double>ss.n_values
    return True


cdef inline int _scalar_add(const LeafSpec* sp, SState* ss, bint has, double x, bint huge) except -1:
    ss.count += 1
    if not has:  # always so for COUNT
        return 0
    if sp.agg == AG_SUM or sp.agg == AG_AVG:
        _fsum_add(&ss.sum, x, huge)
    elif ss.n_values == 0:
        ss.vmin = x
        ss.vmax = x
    else:
        # Python's min/max over arrival order: replace only on a strict improvement.
        if x < ss.vmin:
            ss.vmin = x
        if x > ss.vmax:
            ss.vmax = x
    ss.n_values += 1
    return 0


cdef inline void _scalar_reset(const LeafSpec* sp, SState* ss) noexcept nogil:
    ss.count = 0
    if sp.agg != AG_COUNT:
        ss.n_values = 0
        ss.vmin = 0.0
        ss.vmax = 0.0
        if sp.agg == AG_SUM or sp.agg == AG_AVG:
            _fsum_reset(&ss.sum)


cdef int _reserve(WState* w, Py_ssize_t need, size_t size) except -1:
    cdef Py_ssize_t cap = w.cap
    if need > cap:
        if need > 0x7fffffff:
            raise MemoryError("too many events kept for one leaf")
        _grow(&w.buf, &cap, need, size)
        w.cap = <int32_t>min(cap, 0x7fffffff)
    return 0


cdef int _within_count_add(CompiledState st, const LeafSpec* sp, WState* w, int64_t ts) except -1:
    """Keeps ts if it is among the ``keep`` largest timestamps."""
    cdef int64_t* a
    cdef Py_ssize_t i, n = w.n
    if sp.keep == 0:
        return 0
    if st.horizon != INT64_MIN and ts <= st.horizon - sp.window:
        return 0  # out of every window from now on
    if n >= sp.keep:
        a = <int64_t*>w.buf
        if ts <= a[0]:
            return 0  # not among the keep largest
        memmove(a, a + 1, (n - 1) * sizeof(int64_t))  # drop the smallest
        n -= 1
    else:
        _reserve(w, n + 1, sizeof(int64_t))
        a = <int64_t*>w.buf
    i = n
    while i > 0 and a[i - 1] > ts:
        i -= 1
    memmove(a + i + 1, a + i, (n - i) * sizeof(int64_t))
    a[i] = ts
    w.n = <int32_t>(n + 1)
    w.c_valid = False
    return 0


cdef int _within_agg_add(CompiledState st, const LeafSpec* sp, WState* w, int64_t ts, bint has, double x,
                         bint huge) except -1:
    """Keeps (ts, x) in ts order, after the entries with the same ts."""
    cdef WEntry* e
    cdef Py_ssize_t i, n = w.n
    if st.horizon != INT64_MIN and ts <= st.horizon - sp.window:
        return 0
    _reserve(w, n + 1, sizeof(WEntry))
    e = <WEntry*>w.buf
    i = n
    while i > 0 and e[i - 1].ts > ts:
        i -= 1
    memmove(e + i + 1, e + i, (n - i) * sizeof(WEntry))
    e[i].ts = ts
    e[i].seq = st.seq * 4 + (2 if huge else 0) + (1 if has else 0)
    e[i].v = x
    w.n = <int32_t>(n + 1)
    w.c_valid = False
    return 0


# ---------------------------------------------------------------- state codec primitives

# Byte 0 of a dump. The reference evaluator's dumps begin with REFERENCE_FORMAT, so
# neither evaluator takes the other's bytes for its own.
cdef enum:
    FORMAT_VERSION = 1
    REFERENCE_FORMAT = 0xF1

cdef uint32_t _crc_table[256]
cdef uint32_t _CRC_POLY = 0xEDB88320


cdef void _crc_init() noexcept:
    cdef uint32_t c, k, n
    for n in range(256):
        c = n
        for k in range(8):
            c = (_CRC_POLY ^ (c >> 1)) if (c & 1) else (c >> 1)
        _crc_table[n] = c


_crc_init()


cdef uint32_t _crc32(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # CRC-32 (zlib's), so the reference computes it with zlib.crc32.
    cdef uint32_t c = ~(<uint32_t>0)
    cdef Py_ssize_t i
    for i in range(n):
        c = _crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8)
    return ~c


cdef inline Py_ssize_t _put_uv(uint8_t* p, uint64_t v) noexcept nogil:
    cdef Py_ssize_t i = 0
    while v >= 0x80:
        p[i] = <uint8_t>(v | 0x80)
        v >>= 7
        i += 1
    p[i] = <uint8_t>v
    return i + 1


cdef inline uint64_t _zz(int64_t v) noexcept nogil:
    return (<uint64_t>v << 1) ^ <uint64_t>(v >> 63)


cdef inline int64_t _unzz(uint64_t u) noexcept nogil:
    return <int64_t>(u >> 1) ^ -<int64_t>(u & 1)


cdef inline Py_ssize_t _put_f64(uint8_t* p, double v) noexcept nogil:
    memcpy(p, &v, 8)  # little-endian hosts only: checked at import
    return 8


cdef inline Py_ssize_t _put_u64(uint8_t* p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)
    return 8


cdef struct Reader:
    const uint8_t* p
    Py_ssize_t pos
    Py_ssize_t end


cdef int _corrupt(const char* what) except -1:
    raise ValueError(f"corrupt evaluator state: {what.decode()}")


cdef inline int _get_uv(Reader* r, uint64_t* out) except -1:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while True:
        if r.pos >= r.end:
            _corrupt(b"truncated")
        b = r.p[r.pos]
        r.pos += 1
        if shift == 63 and b > 1:
            _corrupt(b"varint beyond 64 bits")
        v |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            break
        shift += 7
        if shift > 63:
            _corrupt(b"varint beyond 64 bits")
    out[0] = v
    return 0


cdef inline int _get_f64(Reader* r, double* out) except -1:
    if r.end - r.pos < 8:
        _corrupt(b"truncated")
    memcpy(out, r.p + r.pos, 8)
    r.pos += 8
    return 0


cdef inline int _get_u64(Reader* r, uint64_t* out) except -1:
    if r.end - r.pos < 8:
        _corrupt(b"truncated")
    memcpy(out, r.p + r.pos, 8)
    r.pos += 8
    return 0


cdef inline int _get_ts_next(Reader* r, int64_t* prev, bint first, int64_t base) except -1:
    """The next of an ascending run of timestamps: the first zigzag from base (mod 2**64),
    then unsigned deltas."""
    cdef uint64_t u
    _get_uv(r, &u)
    if first:
        prev[0] = <int64_t>(<uint64_t>base + <uint64_t>_unzz(u))
    else:
        if u > <uint64_t>INT64_MAX - <uint64_t>prev[0]:
            _corrupt(b"timestamp beyond 64 bits")
        prev[0] = <int64_t>(<uint64_t>prev[0] + u)
    return 0


cdef inline int _get_count(Reader* r, int64_t limit, int64_t* out) except -1:
    cdef uint64_t u
    _get_uv(r, &u)
    if u > <uint64_t>limit:
        _corrupt(b"count out of range")
    out[0] = <int64_t>u
    return 0


def _check_endianness():
    cdef uint32_t one = 1
    if (<uint8_t*>&one)[0] != 1:
        raise ImportError("qualify.evaluator._evaluator: the state codec assumes a little-endian host")


_check_endianness()


# ---------------------------------------------------------------- evaluator

cdef class CompiledEvaluator:
    """Runs a Program over CompiledStates; agrees with ReferenceEvaluator."""

    cdef readonly object program
    cdef readonly int64_t timeout
    cdef Py_ssize_t n_leaves
    cdef Py_ssize_t n_audiences
    cdef LeafSpec* specs
    cdef Py_ssize_t state_size  # bytes of a person's state block
    cdef dict plans  # model -> tuple of _LeafPlan
    cdef dict qplans  # model -> tuple of _QPlan (sequence leaves); None when there are none
    cdef list qfilters  # the sequence leaves' distinct step filters (PredicateMatcher)
    cdef uint8_t* qfmemo  # per observe: 0 not tested yet, 1 fails, 2 passes
    cdef list qsames  # their distinct same tuples
    cdef Py_ssize_t* qkoff  # per observe: where the event's key for qsames[i] is in kbuf; -2 not built, -1 missing
    cdef Py_ssize_t* qklen
    cdef uint8_t* kbuf  # an event's value keys, built per distinct same tuple
    cdef Py_ssize_t kcap
    cdef Py_ssize_t kend
    cdef int64_t* ivs  # absence leaves: the membership intervals of one evaluation
    cdef Py_ssize_t ivcap
    # The program's distinct properties (names) and filters (PredicateMatcher); an observe call
    # looks each property up, and tests each filter, at most once.
    cdef list props
    cdef list filters
    cdef PyObject** pval  # borrowed from the event's dict for the duration of observe
    cdef double* pnum  # the property as a double, when it is a number
    cdef uint8_t* pmemo  # bits: 1 looked up, 2 number checked, 4 a number, 8 an int beyond a double
    cdef uint8_t* fmemo  # 0 not tested yet, 1 fails, 2 passes
    # Postfix code of every audience back to back; audience a is [starts[a], starts[a+1]).
    cdef uint8_t* ops
    cdef int32_t* args  # STATIC/EVENT: index; AND/OR: how many values the reference's slice pops
    cdef Py_ssize_t* starts
    cdef Py_ssize_t max_static  # the largest static index used, -1 for none
    cdef uint8_t* stack
    cdef uint8_t* memo  # per evaluate call: leaf holds, 2 = not computed yet
    cdef uint8_t* sbuf  # static values converted from a generic sequence
    cdef uint8_t* out  # per evaluate call: audience values
    cdef uint8_t* scratch
    cdef Py_ssize_t scratch_cap
    cdef FSum tmp
    # The state codec: leaf j's section key, and the distinct keys in first-use order
    # (ukeys[u]; its leaves are ufirst[u], then unext[...] until -1).
    cdef uint64_t* keys
    cdef Py_ssize_t n_ukeys
    cdef uint64_t* ukeys
    cdef Py_ssize_t* uof  # leaf j's distinct key index
    cdef Py_ssize_t* ufirst
    cdef Py_ssize_t* unext
    cdef uint8_t* found  # per load: which distinct keys raw had
    cdef uint8_t* wbuf  # dump's output buffer, reused
    cdef Py_ssize_t wcap

    def __cinit__(self):
        self.specs = NULL
        self.ops = NULL
        self.args = NULL
        self.starts = NULL
        self.stack = NULL
        self.memo = NULL
        self.sbuf = NULL
        self.out = NULL
        self.pval = NULL
        self.pnum = NULL
        self.pmemo = NULL
        self.fmemo = NULL
        self.scratch = NULL
        self.scratch_cap = 0
        self.tmp.p = NULL
        self.tmp.cap = 0
        _fsum_reset(&self.tmp)
        self.keys = NULL
        self.ukeys = NULL
        self.uof = NULL
        self.ufirst = NULL
        self.unext = NULL
        self.found = NULL
        self.wbuf = NULL
        self.wcap = 0
        self.qplans = None
        self.qfmemo = NULL
        self.qkoff = NULL
        self.qklen = NULL
        self.kbuf = NULL
        self.kcap = 0
        self.ivs = NULL
        self.ivcap = 0

    def __dealloc__(self):
        free(self.specs)
        free(self.ops)
        free(self.args)
        free(self.starts)
        free(self.stack)
        free(self.memo)
        free(self.sbuf)
        free(self.out)
        free(self.pval)
        free(self.pnum)
        free(self.pmemo)
        free(self.fmemo)
        free(self.scratch)
        free(self.tmp.p)
        free(self.keys)
        free(self.ukeys)
        free(self.uof)
        free(self.ufirst)
        free(self.unext)
        free(self.found)
        free(self.wbuf)
        free(self.kbuf)
        free(self.ivs)
        free(self.qfmemo)
        free(self.qkoff)
        free(self.qklen)

    def __init__(self, program):
        cdef Py_ssize_t j, k, n_code, pc, depth, max_depth, start, a
        cdef LeafSpec* sp
        cdef _LeafPlan plan
        cdef PredicateMatcher flt
        self.program = program
        self.timeout = program.session_timeout_us
        leaves = tuple(program.leaves)
        self.n_leaves = len(leaves)
        self.specs = <LeafSpec*>calloc(self.n_leaves + 1, sizeof(LeafSpec))
        self.memo = <uint8_t*>calloc(self.n_leaves + 1, 1)
        if self.specs == NULL or self.memo == NULL:
            raise MemoryError()
        by_model = {}
        prop_index = {}
        filter_index = {}
        self.props = []
        self.filters = []
        qplans = {}
        qfilter_index = {}
        qsame_index = {}
        self.qfilters = []
        for j, leaf in enumerate(leaves):
            sp = &self.specs[j]
            if isinstance(leaf, SequenceLeaf):
                sp.offset = self.state_size
                _q_spec(sp, leaf, j)
                # without same: the leaf's 64 inline bytes; with same: its QState*, NULL until its first event
                self.state_size += Q_INLINE if sp.inl else sizeof(QState*)
                for model, qplan in _q_plans(j, leaf, qfilter_index, self.qfilters, qsame_index):
                    qplans.setdefault(model, []).append(qplan)
                continue
            sp.model = leaf.model
            sp.scope = int(leaf.scope)
            sp.agg = int(leaf.aggregation)
            sp.cmp = int(leaf.comparison)
            sp.window = leaf.window_us
            sp.threshold = float(leaf.threshold)
            if sp.scope < SC_WITHIN or sp.scope > SC_EVER:
                raise ValueError(f"leaf {j}: unknown scope {leaf.scope!r}")
            if sp.agg < AG_COUNT or sp.agg > AG_AVG:
                raise ValueError(f"leaf {j}: unknown aggregation {leaf.aggregation!r}")
            if sp.cmp < CMP_EQ or sp.cmp > CMP_GE:
                raise ValueError(f"leaf {j}: unknown comparison {leaf.comparison!r}")
            sp.keep = 0
            if sp.scope == SC_WITHIN and sp.agg == AG_COUNT:
                # min(count, keep) decides ``count cmp threshold`` (keep = leaf.keep,
                # floored at 0: a negative threshold is beaten by every count).
                if isnan(sp.threshold) or sp.threshold <= -1.0:
                    sp.keep = 0
                elif sp.threshold >= 4.0e18:
                    sp.keep = KEEP_ALL
                else:
                    sp.keep = <int64_t>sp.threshold + 1
            if sp.agg == AG_COUNT:
                sp.empty_holds = _compare(sp.cmp, 0.0, sp.threshold)
            else:
                sp.empty_holds = sp.cmp == CMP_NE
            # Each leaf's part of a person's block: only what its kind uses.
            sp.offset = self.state_size
            if sp.scope == SC_WITHIN:
                self.state_size += sizeof(WState)
            elif sp.agg == AG_COUNT:
                self.state_size += 2 * sizeof(int64_t)  # count, session
            elif sp.agg == AG_MIN or sp.agg == AG_MAX:
                self.state_size += 3 * sizeof(int64_t) + 2 * sizeof(double)  # ... n_values, vmin, vmax
            else:
                self.state_size += sizeof(SState)
            plan = _LeafPlan()
            plan.j = j
            fids = []
            for f in leaf.filters:
                key = _filter_key(f)
                if key not in filter_index:
                    flt = PredicateMatcher(f.op, f.values, f.property)
                    flt.pidx = prop_index.setdefault(f.property, len(prop_index))
                    filter_index[key] = len(self.filters)
                    self.filters.append(flt)
                fids.append(filter_index[key])
            plan.n_filters = len(fids)
            plan.filters = <int32_t*>calloc(len(fids) + 1, sizeof(int32_t))
            if plan.filters == NULL:
                raise MemoryError()
            for k, fid in enumerate(fids):
                plan.filters[k] = fid
            if sp.agg != AG_COUNT and leaf.property:
                plan.prop = prop_index.setdefault(leaf.property, len(prop_index))
            by_model.setdefault(leaf.model, []).append(plan)
        self.plans = {m: tuple(p) for m, p in by_model.items()}
        self.qplans = {m: tuple(p) for m, p in qplans.items()} if qplans else None
        self.qsames = sorted(qsame_index, key=qsame_index.__getitem__)
        self.qfmemo = <uint8_t*>calloc(len(self.qfilters) + 1, 1)
        self.qkoff = <Py_ssize_t*>calloc(len(self.qsames) + 1, sizeof(Py_ssize_t))
        self.qklen = <Py_ssize_t*>calloc(len(self.qsames) + 1, sizeof(Py_ssize_t))
        if self.qfmemo == NULL or self.qkoff == NULL or self.qklen == NULL:
            raise MemoryError()
        self.props = sorted(prop_index, key=prop_index.__getitem__)
        self.pval = <PyObject**>calloc(len(self.props) + 1, sizeof(PyObject*))
        self.pnum = <double*>calloc(len(self.props) + 1, sizeof(double))
        self.pmemo = <uint8_t*>calloc(len(self.props) + 1, 1)
        self.fmemo = <uint8_t*>calloc(len(self.filters) + 1, 1)
        if self.pval == NULL or self.pnum == NULL or self.pmemo == NULL or self.fmemo == NULL:
            raise MemoryError()

        audiences = [tuple((int(op), int(arg)) for op, arg in code) for code in program.audiences]
        self.n_audiences = len(audiences)
        n_code = sum(len(code) for code in audiences)
        self.ops = <uint8_t*>calloc(n_code + 1, 1)
        self.args = <int32_t*>calloc(n_code + 1, sizeof(int32_t))
        self.starts = <Py_ssize_t*>calloc(self.n_audiences + 1, sizeof(Py_ssize_t))
        if self.ops == NULL or self.args == NULL or self.starts == NULL:
            raise MemoryError()
        pc = 0
        max_depth = 1
        self.max_static = -1
        for a, code in enumerate(audiences):
            self.starts[a] = pc
            depth = 0
            for op, arg in code:
                if op == CODE_STATIC:
                    if arg < 0:
                        raise ValueError(f"audience {a}: STATIC {arg}")
                    self.max_static = max(self.max_static, arg)
                    depth += 1
                elif op == CODE_EVENT:
                    if not 0 <= arg < self.n_leaves:
                        raise ValueError(f"audience {a}: EVENT {arg} with {self.n_leaves} leaves")
                    depth += 1
                elif op == CODE_AND or op == CODE_OR:
                    # reference.run pops ``stack[-arg:]``: the slice's length, whatever arg is.
                    start = -arg
                    if start < 0:
                        start = max(start + depth, 0)
                    else:
                        start = min(start, depth)
                    arg = depth - start
                    depth = start + 1
                elif op == CODE_NOT:
                    if depth == 0:
                        raise ValueError(f"audience {a}: NOT on an empty stack")
                else:
                    raise ValueError(f"audience {a}: unknown instruction {op}")
                self.ops[pc] = op
                self.args[pc] = arg
                pc += 1
                max_depth = max(max_depth, depth)
            if depth != 1:
                raise ValueError(f"audience {a}: malformed program")
        self.starts[self.n_audiences] = pc
        self.stack = <uint8_t*>calloc(max_depth + 1, 1)
        self.sbuf = <uint8_t*>calloc(self.max_static + 2, 1)
        self.out = <uint8_t*>calloc(self.n_audiences + 1, 1)
        if self.stack == NULL or self.sbuf == NULL or self.out == NULL:
            raise MemoryError()
        self._init_codec(leaves)

    # ------------------------------------------------------------ events

    def new_state(self):
        """A person with no events yet."""
        cdef CompiledState st = CompiledState.__new__(CompiledState)
        cdef Py_ssize_t j
        st.block = <char*>calloc(self.state_size if self.state_size > 0 else 1, 1)
        if st.block == NULL:
            raise MemoryError()
        st.owner = self
        st.specs = self.specs
        st.n_leaves = self.n_leaves
        st.size = self.state_size
        for j in range(self.n_leaves):
            if self.specs[j].kind == KIND_EVENT and self.specs[j].scope == SC_SESSION:
                _sstate(st.block, &self.specs[j]).session = -1
        return st

    cdef inline int _check(self, CompiledState st) except -1:
        if st.specs != self.specs:
            raise ValueError("the state was not made by this evaluator's new_state()")
        return 0

    cdef inline object _prop(self, dict props, Py_ssize_t i):
        """The event's value of distinct property i (None: missing), looked up once per event."""
        if not (self.pmemo[i] & 1):
            # Borrowed: the dict outlives the observe call and nothing here mutates it.
            self.pval[i] = PyDict_GetItem(props, <object>PyList_GET_ITEM(self.props, i))
            self.pmemo[i] |= 1
        if self.pval[i] == NULL:
            return None
        return <object>self.pval[i]

    def observe(self, CompiledState state not None, model, int64_t ts_us, properties, session_id=""):
        """Records one event of ``model`` (already matched to the model) for the person."""
        cdef CompiledState st = state
        cdef _LeafPlan plan
        cdef PredicateMatcher f
        cdef LeafSpec* sp
        cdef SState* ss
        cdef dict props
        cdef bint ok, has, huge
        cdef double x
        cdef object v
        cdef Py_ssize_t k, i
        cdef int32_t fid
        cdef uint8_t r, m
        self._check(st)
        if session_id is None:
            session_id = ""
        if (st.session < 0 or ts_us >= st.session_last_ts + self.timeout
                or (session_id and session_id != st.session_id)):
            st.session += 1
            st.session_id = session_id
            st.session_last_ts = ts_us
        elif ts_us > st.session_last_ts:
            st.session_last_ts = ts_us
        st.seq += 1
        if self.qplans is not None:
            qplans = self.qplans.get(model)
            if qplans is not None:
                _q_observe(self, st, <tuple>qplans, ts_us, properties)
        plans = self.plans.get(model)
        if plans is None:
            return
        props = properties if type(properties) is dict else dict(properties)
        memset(self.pmemo, 0, len(self.props))
        memset(self.fmemo, 0, len(self.filters))
        for p in <tuple>plans:
            plan = <_LeafPlan>p
            ok = True
            for k in range(plan.n_filters):
                fid = plan.filters[k]
                r = self.fmemo[fid]
                if r == 0:  # a filter several leaves share is tested once per event
                    f = <PredicateMatcher>PyList_GET_ITEM(self.filters, fid)
                    r = 2 if f.test(self._prop(props, f.pidx)) else 1
                    self.fmemo[fid] = r
                if r == 1:
                    ok = False
                    break
            if not ok:
                continue
            has = False
            huge = False
            x = 0.0
            if plan.prop >= 0:
                i = plan.prop
                m = self.pmemo[i]
                if not (m & 2):
                    v = self._prop(props, i)
                    m = self.pmemo[i] | 2
                    if v is not None and _is_number(v):
                        self.pnum[i] = _as_double(v, &huge)
                        m |= 4 | (8 if huge else 0)
                    self.pmemo[i] = m
                if m & 4:
                    has = True
                    huge = (m & 8) != 0
                    x = self.pnum[i]
            sp = &self.specs[plan.j]
            if sp.scope == SC_WITHIN:
                if sp.agg == AG_COUNT:
                    _within_count_add(st, sp, _wstate(st.block, sp), ts_us)
                else:
                    _within_agg_add(st, sp, _wstate(st.block, sp), ts_us, has, x, huge)
            else:
                ss = _sstate(st.block, sp)
                if sp.scope == SC_SESSION and ss.session != st.session:
                    _scalar_reset(sp, ss)
                    ss.session = st.session
                _scalar_add(sp, ss, has, x, huge)

    # ------------------------------------------------------------ leaf values

    cdef int _within(self, CompiledState st, const LeafSpec* sp, int64_t now,
                     int64_t* count, bint* has, double* value) except -1:
        """Computes a WITHIN leaf at ``now`` (<= horizon), refreshing its cache; returns holds."""
        cdef WState* ws = _wstate(st.block, sp)
        cdef int64_t w = sp.window, cutoff = st.horizon - sp.window
        cdef Py_ssize_t n = ws.n, i, g
        cdef bint holds, first_nan = False, any_num = False
        cdef int64_t first_seq = INT64_MAX, nv = 0, flip = NO_FLIP
        cdef double mn = 0.0, mx = 0.0, v, agg = 0.0, sumabs = 0.0
        cdef int64_t* a
        cdef WEntry* e
        cdef uint8_t* hs
        cdef FSum* fs = &self.tmp
        if sp.agg == AG_COUNT:
            a = <int64_t*>ws.buf
            # Drop what is out of every window from the horizon on (sorted by ts).
            i = 0
            while i < n and a[i] <= cutoff:
                i += 1
            if i:
                n -= i
                memmove(a, a + i, n * sizeof(int64_t))
                ws.n = <int32_t>n
            # Every kept timestamp is inside the window now: min(count, keep) is n, and
            # it drops at each kept ts + window.
            holds = _compare(sp.cmp, <double>n, sp.threshold)
            count[0] = n
            has[0] = True
            value[0] = <double>n
            i = 0
            while i < n:
                g = i + 1
                while g < n and a[g] == a[i]:
                    g += 1
                if _compare(sp.cmp, <double>(n - g), sp.threshold) != holds:
                    flip = a[i] + w
                    break
                i = g
        else:
            e = <WEntry*>ws.buf
            i = 0
            while i < n and e[i].ts <= cutoff:
                i += 1
            if i:
                n -= i
                memmove(e, e + i, n * sizeof(WEntry))
                ws.n = <int32_t>n
            if n + 1 > self.scratch_cap:
                _grow(<void**>&self.scratch, &self.scratch_cap, n + 1, 1)
            hs = self.scratch
            # One pass from the newest: hs[i] is holds over e[i:], for each i that starts
            # a run of equal ts; e[i:] is what is left once e[i-1] has left the window.
            hs[n] = sp.empty_holds
            has[0] = False
            _fsum_reset(fs)
            i = n
            while i > 0:
                i -= 1
                if e[i].seq & 1:
                    v = e[i].v
                    nv += 1
                    if sp.agg == AG_SUM or sp.agg == AG_AVG:
                        _fsum_add(fs, v, (e[i].seq & 2) != 0)
                        if isfinite(v):
                            sumabs += fabs(v)
                    else:
                        if e[i].seq < first_seq:
                            first_seq = e[i].seq
                            first_nan = isnan(v)
                        if not isnan(v):
                            if not any_num:
                                mn = v
                                mx = v
                                any_num = True
                            else:
                                if v < mn:
                                    mn = v
                                if v > mx:
                                    mx = v
                if i == 0 or e[i - 1].ts != e[i].ts:
                    if nv == 0:
                        hs[i] = sp.empty_holds
                    else:
                        if sp.agg == AG_SUM or sp.agg == AG_AVG:
                            # The sum does not depend on the order of the values unless math.fsum
                            # would overflow, and it cannot while the finite ones add up to less
                            # than a double's range: otherwise add them in arrival order, as the
                            # reference does.
                            if sumabs > 1e307 or _fsum_raises(fs):
                                agg = _exact_sum_by_arrival(e + i, n - i)
                            else:
                                agg = _fsum_value(fs)
                            if sp.agg == AG_AVG:
                                agg = agg / <double>nv
                        elif first_nan:
                            agg = NAN  # Python's min/max keep a NaN that comes first
                        elif sp.agg == AG_MIN:
                            agg = mn
                        else:
                            agg = mx
                        hs[i] = _compare(sp.cmp, agg, sp.threshold)
                        if i == 0:
                            has[0] = True
                            value[0] = agg
            holds = hs[0]
            count[0] = n
            i = 0
            while i < n:
                g = i + 1
                while g < n and e[g].ts == e[i].ts:
                    g += 1
                if hs[g] != holds:
                    flip = e[i].ts + w
                    break
                i = g
        ws.c_valid = True
        ws.c_holds = holds
        ws.c_from = now
        ws.c_until = flip
        return holds

    cdef inline int _holds(self, CompiledState st, const LeafSpec* sp, int64_t now) except -1:
        cdef WState* ws
        cdef SState* ss
        cdef int64_t count = 0
        cdef bint has = False
        cdef double v = 0.0
        if sp.kind != KIND_EVENT:
            return _q_holds(self, st, sp, now)
        if sp.scope == SC_WITHIN:
            ws = _wstate(st.block, sp)
            if ws.c_valid and ws.c_from <= now and now < ws.c_until:
                return ws.c_holds
            return self._within(st, sp, now, &count, &has, &v)
        ss = _sstate(st.block, sp)
        if sp.scope == SC_SESSION and not (
                st.session >= 0 and now < st.session_last_ts + self.timeout and ss.session == st.session):
            return sp.empty_holds
        has = _scalar_value(sp, ss, &v)
        return _value_holds(sp, has, v)

    cdef int64_t _flip(self, CompiledState st, const LeafSpec* sp, int64_t now) except? -1:
        """The first instant after ``now`` at which the leaf flips by itself; NO_FLIP for never."""
        cdef WState* ws
        if sp.kind != KIND_EVENT:
            return _q_flip(self, st, sp, now)
        if sp.scope == SC_WITHIN:
            ws = _wstate(st.block, sp)
            if not (ws.c_valid and ws.c_from <= now and now < ws.c_until):
                self._holds(st, sp, now)
            return ws.c_until
        if sp.scope == SC_SESSION and st.session >= 0 and now < st.session_last_ts + self.timeout:
            # an open session ends at its latest timestamp + timeout, and then nothing is in scope
            if self._holds(st, sp, now) != sp.empty_holds:
                return st.session_last_ts + self.timeout
        return NO_FLIP

    def leaf(self, CompiledState state not None, Py_ssize_t j, int64_t now_us):
        """Event leaf j's value at ``now_us``, and when it next flips by itself.

        For WITHIN + COUNT leaves ``count`` (and ``aggregate``) is
        min(count, max(leaf.keep, 0)): only that many timestamps are kept, and
        that is all the comparison needs. ``holds`` and ``flips_at`` are exact.
        """
        cdef CompiledState st = state
        cdef const LeafSpec* sp
        cdef SState* ss
        cdef int64_t count = 0, flip
        cdef bint has = False, holds
        cdef double v = 0.0
        self._check(st)
        if j < 0:
            j += self.n_leaves  # a sequence index, as program.leaves[j] in the reference
        if j < 0 or j >= self.n_leaves:
            raise IndexError("event leaf index out of range")
        if now_us > st.horizon:
            st.horizon = now_us
        sp = &self.specs[j]
        if sp.kind != KIND_EVENT:
            holds = _q_holds(self, st, sp, now_us)
            flip = _q_flip(self, st, sp, now_us)
            return LeafValue(holds, _q_progress(self, st, sp, now_us).steps_done, None,
                             None if flip == NO_FLIP else flip)
        if sp.scope == SC_WITHIN:
            holds = self._within(st, sp, now_us, &count, &has, &v)
        else:
            ss = _sstate(st.block, sp)
            if sp.scope == SC_SESSION and not (
                    st.session >= 0 and now_us < st.session_last_ts + self.timeout and ss.session == st.session):
                has = sp.agg == AG_COUNT  # nothing in scope: count 0, other aggregates missing
            else:
                count = ss.count
                has = _scalar_value(sp, ss, &v)
            holds = _value_holds(sp, has, v)
        flip = self._flip(st, sp, now_us)
        return LeafValue(holds, count, v if has else None, None if flip == NO_FLIP else flip)

    def progress(self, CompiledState state not None, Py_ssize_t j, int64_t now_us):
        """How far sequence leaf j's best match has got at ``now_us``: a SequenceProgress."""
        self._check(state)
        if j < 0 or j >= self.n_leaves:
            raise IndexError("event leaf index out of range")
        if self.specs[j].kind == KIND_EVENT:
            raise TypeError(f"leaf {j} is not a sequence leaf")
        if now_us > state.horizon:
            state.horizon = now_us
        return _q_progress(self, state, &self.specs[j], now_us)

    # ------------------------------------------------------------ audiences

    cdef int _run(self, CompiledState st, int64_t now, object static, uint8_t* out) except -1:
        cdef const uint8_t* sv = NULL
        cdef Py_ssize_t sn = 0, a, pc, end, k, sp
        cdef uint8_t op, r
        cdef int32_t arg
        cdef int h
        cdef Py_buffer view
        cdef bint released = True
        cdef const char* fmt
        cdef uint8_t* stack = self.stack
        cdef uint8_t* memo = self.memo
        self._check(st)
        if now > st.horizon:
            st.horizon = now
        # Static values: bytes, bytearray or a 1-byte buffer (numpy bool/uint8) read in place.
        if type(static) is bytes:
            sv = <const uint8_t*>PyBytes_AS_STRING(static)
            sn = PyBytes_GET_SIZE(static)
        elif type(static) is bytearray:
            sv = <const uint8_t*>PyByteArray_AS_STRING(static)
            sn = PyByteArray_GET_SIZE(static)
        elif PyObject_CheckBuffer(static):
            try:
                PyObject_GetBuffer(static, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS)
                released = False
            except BufferError:
                pass
            if not released:
                fmt = view.format
                if fmt != NULL and fmt[0] != 0 and fmt[0] in b'@=<>!|':
                    fmt += 1
                if view.itemsize == 1 and (fmt == NULL or (fmt[0] in b'?Bbc' and fmt[1] == 0)):
                    sv = <const uint8_t*>view.buf
                    sn = view.len
                else:
                    PyBuffer_Release(&view)
                    released = True
        try:
            if sv == NULL:
                if type(static) is list and PyList_GET_SIZE(static) > self.max_static:
                    for k in range(self.max_static + 1):
                        item = <object>PyList_GET_ITEM(static, k)
                        self.sbuf[k] = 1 if (item is True or (item is not False and item)) else 0
                else:
                    for k in range(self.max_static + 1):
                        self.sbuf[k] = 1 if static[k] else 0
                sv = self.sbuf
                sn = self.max_static + 1
            elif sn <= self.max_static:
                raise IndexError(f"static has {sn} values, the program reads static[{self.max_static}]")
            memset(memo, 2, self.n_leaves)
            for a in range(self.n_audiences):
                sp = 0
                end = self.starts[a + 1]
                for pc in range(self.starts[a], end):
                    op = self.ops[pc]
                    arg = self.args[pc]
                    if op == CODE_EVENT:
                        if memo[arg] == 2:
                            h = self._holds(st, &self.specs[arg], now)
                            memo[arg] = <uint8_t>h
                        stack[sp] = memo[arg]
                        sp += 1
                    elif op == CODE_STATIC:
                        stack[sp] = 1 if sv[arg] else 0
                        sp += 1
                    elif op == CODE_AND:
                        r = 1
                        for k in range(sp - arg, sp):
                            r &= stack[k]
                        sp -= arg
                        stack[sp] = r
                        sp += 1
                    elif op == CODE_OR:
                        r = 0
                        for k in range(sp - arg, sp):
                            r |= stack[k]
                        sp -= arg
                        stack[sp] = r
                        sp += 1
                    else:  # NOT
                        stack[sp - 1] ^= 1
                out[a] = stack[0]
        finally:
            if not released:
                PyBuffer_Release(&view)
        return 0

    def evaluate(self, CompiledState state not None, int64_t now_us, static):
        """Every audience's value for the person at ``now_us`` (a list of bools)."""
        cdef Py_ssize_t a
        cdef uint8_t* out = self.out
        cdef list result
        self._run(state, now_us, static, out)
        result = [False] * self.n_audiences
        for a in range(self.n_audiences):
            if out[a]:
                result[a] = True
        return result

    def evaluate_bytes(self, CompiledState state not None, int64_t now_us, static):
        """Like evaluate, as bytes: one 0/1 byte per audience."""
        self._run(state, now_us, static, self.out)
        return PyBytes_FromStringAndSize(<char*>self.out, self.n_audiences)

    def next_change(self, CompiledState state not None, int64_t now_us):
        """The first instant after ``now_us`` at which some event leaf flips with no new event."""
        cdef CompiledState st = state
        cdef Py_ssize_t j
        cdef int64_t best = NO_FLIP, t
        self._check(st)
        if now_us > st.horizon:
            st.horizon = now_us
        for j in range(self.n_leaves):
            t = self._flip(st, &self.specs[j], now_us)
            if t < best:
                best = t
        return None if best == NO_FLIP else best


    # ------------------------------------------------------------ state codec (format in the module docstring)

    cdef int _init_codec(self, leaves) except -1:
        cdef Py_ssize_t j, u, n = self.n_leaves
        self.keys = <uint64_t*>calloc(n + 1, sizeof(uint64_t))
        self.ukeys = <uint64_t*>calloc(n + 1, sizeof(uint64_t))
        self.uof = <Py_ssize_t*>calloc(n + 1, sizeof(Py_ssize_t))
        self.ufirst = <Py_ssize_t*>calloc(n + 1, sizeof(Py_ssize_t))
        self.unext = <Py_ssize_t*>calloc(n + 1, sizeof(Py_ssize_t))
        self.found = <uint8_t*>calloc(n + 1, 1)
        if (self.keys == NULL or self.ukeys == NULL or self.uof == NULL or self.ufirst == NULL
                or self.unext == NULL or self.found == NULL):
            raise MemoryError()
        index = {}
        last = {}
        for j, leaf in enumerate(leaves):
            key = state_key_hash(leaf)
            self.keys[j] = key
            self.unext[j] = -1
            if key in index:
                u = index[key]
                self.unext[last[u]] = j
            else:
                u = len(index)
                index[key] = u
                self.ukeys[u] = key
                self.ufirst[u] = j
            last[u] = j
            self.uof[j] = u
        self.n_ukeys = len(index)
        return 0

    cdef Py_ssize_t _section_bound(self, CompiledState st, const LeafSpec* sp) noexcept:
        cdef WState* ws
        cdef SState* ss
        if sp.kind != KIND_EVENT:
            return _q_section_bound(st, sp)
        if sp.scope == SC_WITHIN:
            ws = _wstate(st.block, sp)
            return 10 + ws.n * (10 if sp.agg == AG_COUNT else 28)
        ss = _sstate(st.block, sp)
        if sp.agg == AG_SUM or sp.agg == AG_AVG:
            return 48 + 10 + ss.sum.n * 8 + 16
        return 48

    cdef Py_ssize_t _put_section(self, CompiledState st, const LeafSpec* sp, uint8_t* p) noexcept:
        """Writes one leaf's payload at p; returns its length (0: empty)."""
        cdef WState* ws
        cdef SState* ss
        cdef Py_ssize_t i, i0, q = 0, n
        cdef int64_t cutoff, prev = 0
        cdef int64_t* a
        cdef WEntry* e
        cdef uint8_t flags
        if sp.kind != KIND_EVENT:
            return _q_put_section(st, sp, p)
        if sp.scope == SC_WITHIN:
            ws = _wstate(st.block, sp)
            n = ws.n
            # What is out of every window from the horizon on is dropped on the next
            # query anyway: not worth a byte.
            cutoff = st.horizon - sp.window if st.horizon != INT64_MIN else INT64_MIN
            i0 = 0
            if sp.agg == AG_COUNT:
                a = <int64_t*>ws.buf
                while i0 < n and a[i0] <= cutoff:
                    i0 += 1
                if i0 == n:
                    return 0
                q += _put_uv(p + q, <uint64_t>(n - i0))
                q += _put_uv(p + q, _zz(<int64_t>(<uint64_t>a[i0] - <uint64_t>st.session_last_ts)))
                for i in range(i0 + 1, n):
                    q += _put_uv(p + q, <uint64_t>a[i] - <uint64_t>a[i - 1])
            else:
                e = <WEntry*>ws.buf
                while i0 < n and e[i0].ts <= cutoff:
                    i0 += 1
                if i0 == n:
                    return 0
                q += _put_uv(p + q, <uint64_t>(n - i0))
                for i in range(i0, n):
                    if i == i0:
                        q += _put_uv(p + q, _zz(<int64_t>(<uint64_t>e[i].ts - <uint64_t>st.session_last_ts)))
                    else:
                        q += _put_uv(p + q, <uint64_t>e[i].ts - <uint64_t>e[i - 1].ts)
                    q += _put_uv(p + q, <uint64_t>e[i].seq)
                    if e[i].seq & 1:
                        q += _put_f64(p + q, e[i].v)
            return q
        ss = _sstate(st.block, sp)
        # A SESSION leaf counting a session that is over is empty: the next event resets it.
        if ss.count == 0 or (sp.scope == SC_SESSION and ss.session != st.session):
            return 0
        q += _put_uv(p + q, <uint64_t>ss.count)
        if sp.agg == AG_COUNT:
            return q
        q += _put_uv(p + q, <uint64_t>ss.n_values)
        if ss.n_values == 0:
            return q
        if sp.agg == AG_MIN or sp.agg == AG_MAX:
            q += _put_f64(p + q, ss.vmin)
            q += _put_f64(p + q, ss.vmax)
            return q
        flags = (1 if ss.sum.failed else 0) | (2 if (ss.sum.special != 0.0 or ss.sum.inf != 0.0) else 0)
        p[q] = flags
        q += 1
        q += _put_f64(p + q, ss.sum.naive)
        q += _put_uv(p + q, <uint64_t>ss.sum.n)
        for i in range(ss.sum.n):
            q += _put_f64(p + q, ss.sum.p[i])
        if flags & 2:
            q += _put_f64(p + q, ss.sum.special)
            q += _put_f64(p + q, ss.sum.inf)
        return q

    def dump(self, CompiledState state not None):
        """The person's whole state as bytes (see the module docstring); ``load`` restores it."""
        cdef CompiledState st = state
        cdef Py_ssize_t u, j, bound, q, k, m
        cdef const LeafSpec* sp
        cdef uint8_t* p
        cdef uint8_t tmp[10]
        cdef bytes sid
        self._check(st)
        sid = (<str?>st.session_id).encode("utf-8", "surrogatepass")
        bound = 1 + 5 * 10 + len(sid) + 4
        for u in range(self.n_ukeys):
            bound += 8 + 10 + self._section_bound(st, &self.specs[self.ufirst[u]])
        if bound > self.wcap:
            _grow(<void**>&self.wbuf, &self.wcap, bound, 1)
        p = self.wbuf
        p[0] = FORMAT_VERSION
        q = 1
        q += _put_uv(p + q, <uint64_t>(st.session + 1))
        q += _put_uv(p + q, <uint64_t>len(sid))
        memcpy(p + q, PyBytes_AS_STRING(sid), len(sid))
        q += len(sid)
        q += _put_uv(p + q, _zz(st.session_last_ts))
        q += _put_uv(p + q, <uint64_t>st.seq)
        q += _put_uv(p + q, _zz(<int64_t>(<uint64_t>st.horizon - <uint64_t>st.session_last_ts)))
        q += _put_uv(p + q, <uint64_t>self.n_ukeys)
        for u in range(self.n_ukeys):
            q += _put_u64(p + q, self.ukeys[u])
            # The payload goes after a one-byte length; a longer length moves it up.
            m = self._put_section(st, &self.specs[self.ufirst[u]], p + q + 1)
            k = _put_uv(tmp, <uint64_t>m)
            if k > 1:
                memmove(p + q + k, p + q + 1, m)
            memcpy(p + q, tmp, k)
            q += k + m
        k = _crc32(p, q)
        memcpy(p + q, &k, 4)
        return PyBytes_FromStringAndSize(<char*>p, q + 4)

    cdef int _get_section(self, CompiledState st, const LeafSpec* sp, Reader* r) except -1:
        cdef WState* ws
        cdef SState* ss
        cdef Py_ssize_t i
        cdef int64_t k, ts = 0, limit
        cdef uint64_t u
        cdef int64_t* a
        cdef WEntry* e
        cdef uint8_t flags
        if sp.kind != KIND_EVENT:
            return _q_get_section(st, sp, r)
        if sp.scope == SC_WITHIN:
            ws = _wstate(st.block, sp)
            # every kept event takes at least one byte
            limit = r.end - r.pos
            if sp.agg == AG_COUNT and sp.keep < limit:
                limit = sp.keep
            _get_count(r, limit, &k)
            if sp.agg == AG_COUNT:
                _reserve(ws, k, sizeof(int64_t))
                a = <int64_t*>ws.buf
                for i in range(k):
                    _get_ts_next(r, &ts, i == 0, st.session_last_ts)
                    a[i] = ts
                    ws.n = <int32_t>(i + 1)
            else:
                _reserve(ws, k, sizeof(WEntry))
                e = <WEntry*>ws.buf
                for i in range(k):
                    _get_ts_next(r, &ts, i == 0, st.session_last_ts)
                    _get_uv(r, &u)
                    if (u >> 2) > <uint64_t>st.seq or (u & 3) == 2:
                        _corrupt(b"window entry out of range")
                    e[i].ts = ts
                    e[i].seq = <int64_t>u
                    e[i].v = 0.0
                    if u & 1:
                        _get_f64(r, &e[i].v)
                    ws.n = <int32_t>(i + 1)
            return 0
        ss = _sstate(st.block, sp)
        _get_count(r, INT64_MAX, &ss.count)
        if sp.scope == SC_SESSION:
            if st.session < 0:
                _corrupt(b"a session count with no session")
            ss.session = st.session
        if sp.agg == AG_COUNT:
            return 0
        _get_count(r, ss.count, &ss.n_values)
        if ss.n_values == 0:
            return 0
        if sp.agg == AG_MIN or sp.agg == AG_MAX:
            _get_f64(r, &ss.vmin)
            _get_f64(r, &ss.vmax)
            return 0
        if r.pos >= r.end:
            _corrupt(b"truncated")
        flags = r.p[r.pos]
        r.pos += 1
        if flags > 3:
            _corrupt(b"unknown sum flags")
        ss.sum.failed = (flags & 1) != 0
        _get_f64(r, &ss.sum.naive)
        _get_count(r, (r.end - r.pos) // 8, &k)
        _grow(<void**>&ss.sum.p, &ss.sum.cap, k, sizeof(double))
        for i in range(k):
            _get_f64(r, &ss.sum.p[i])
            ss.sum.n = i + 1
        if flags & 2:
            _get_f64(r, &ss.sum.special)
            _get_f64(r, &ss.sum.inf)
        return 0

    cdef CompiledState _load(self, raw):
        """A state from ``raw``; self.found[u] says which distinct keys raw had."""
        cdef CompiledState st = self.new_state()
        cdef Py_buffer view
        cdef const uint8_t* p
        cdef Py_ssize_t n, i, u, j, end
        cdef uint64_t v, key, n_sections
        cdef uint32_t crc
        cdef Reader r, sub
        memset(self.found, 0, self.n_ukeys)
        if raw is None:
            return st
        PyObject_GetBuffer(raw, &view, PyBUF_C_CONTIGUOUS)
        try:
            p = <const uint8_t*>view.buf
            n = view.len
            if n == 0:
                return st
            if p[0] != FORMAT_VERSION:
                if p[0] == REFERENCE_FORMAT:
                    raise ValueError("evaluator state dumped by the reference evaluator: "
                                     "the compiled evaluator reads only its own format")
                raise ValueError(f"unknown evaluator state format version {p[0]} (this build reads "
                                 f"version {FORMAT_VERSION})")
            if n < 6:
                _corrupt(b"truncated")
            memcpy(&crc, p + n - 4, 4)
            if crc != _crc32(p, n - 4):
                _corrupt(b"checksum mismatch")
            r.p = p
            r.pos = 1
            r.end = n - 4
            _get_uv(&r, &v)
            if v > <uint64_t>INT64_MAX:
                _corrupt(b"session number out of range")
            st.session = <int64_t>v - 1
            _get_uv(&r, &v)
            if v > <uint64_t>(r.end - r.pos):
                _corrupt(b"truncated session id")
            st.session_id = (<const char*>p + r.pos)[:v].decode("utf-8", "surrogatepass")
            r.pos += v
            _get_uv(&r, &v)
            st.session_last_ts = _unzz(v)
            _get_uv(&r, &v)
            if v > <uint64_t>(INT64_MAX // 4):
                _corrupt(b"arrival counter out of range")
            st.seq = <int64_t>v
            _get_uv(&r, &v)
            st.horizon = <int64_t>(<uint64_t>st.session_last_ts + <uint64_t>_unzz(v))
            _get_uv(&r, &n_sections)
            if n_sections > <uint64_t>((r.end - r.pos) // 9):
                _corrupt(b"more sections than bytes")
            for i in range(<Py_ssize_t>n_sections):
                _get_u64(&r, &key)
                _get_uv(&r, &v)
                if v > <uint64_t>(r.end - r.pos):
                    _corrupt(b"truncated section")
                end = r.pos + <Py_ssize_t>v
                # Same program: section i is distinct key i. Otherwise look it up; a leaf
                # the program no longer has is skipped.
                u = i
                if not (u < self.n_ukeys and self.ukeys[u] == key):
                    u = 0
                    while u < self.n_ukeys and self.ukeys[u] != key:
                        u += 1
                if u < self.n_ukeys:
                    if self.found[u]:
                        _corrupt(b"a section twice")
                    self.found[u] = 1
                    if v:
                        j = self.ufirst[u]
                        while j >= 0:
                            sub.p = p
                            sub.pos = r.pos
                            sub.end = end
                            self._get_section(st, &self.specs[j], &sub)
                            if sub.pos != sub.end:
                                _corrupt(b"section length mismatch")
                            j = self.unext[j]
                r.pos = end
            if r.pos != r.end:
                _corrupt(b"trailing bytes")
        finally:
            PyBuffer_Release(&view)
        return st

    def load(self, raw):
        """A person's state from ``dump``'s bytes (any buffer); None or b"" gives a new state.

        Bytes dumped under another program restore the leaves whose state key
        (program.state_key) both programs have; the others start empty
        (``missing_leaves`` names them). Raises ValueError on corrupt input or
        an unknown format version.
        """
        return self._load(raw)

    cdef tuple _missing(self):
        return tuple(j for j in range(self.n_leaves) if not self.found[self.uof[j]])

    def missing_leaves(self, raw):
        """Indices of this program's leaves whose state ``raw`` lacks (all of them for None or b"")."""
        self._load(raw)
        return self._missing()

    def load_with_missing(self, raw):
        """``(load(raw), missing_leaves(raw))`` from one decode."""
        st = self._load(raw)
        return st, self._missing()

    # ------------------------------------------------------------ backfill

    def graft(self, CompiledState state not None, CompiledState donor not None, pairs):
        """Gives ``state`` the donor's state of some leaves: ``pairs`` of (leaf j here, leaf k of the donor's).

        A leaf added to the program after the person's state was made (a new
        or changed audience) learns their history this way: the donor, made
        by any evaluator whose leaf k has the same state key as leaf j here,
        has seen the person's retained events in order (a suffix of what the
        state has seen). Arrival numbers are shifted so that the donor's
        latest is the state's; a SESSION leaf keeps its count only when the
        donor's current session is the state's (same id, same latest event).
        """
        cdef CompiledState st = state, dn = donor
        cdef const LeafSpec* sp
        cdef const LeafSpec* dp
        cdef WState* w
        cdef WState* dw
        cdef SState* ss
        cdef SState* ds
        cdef WEntry* e
        cdef Py_ssize_t j, k, i, n
        cdef size_t size
        cdef int64_t shift = (st.seq - dn.seq) * 4, s
        cdef bint same_session
        self._check(st)
        same_session = (dn.session >= 0 and st.session >= 0 and dn.session_last_ts == st.session_last_ts
                        and dn.session_id == st.session_id)
        for j, k in pairs:
            if not (0 <= j < self.n_leaves and 0 <= k < dn.n_leaves):
                raise IndexError("graft: event leaf index out of range")
            sp = &self.specs[j]
            dp = &dn.specs[k]
            if sp.kind != KIND_EVENT or dp.kind != KIND_EVENT:
                _q_graft(st, dn, sp, dp, same_session)
                continue
            if (sp.scope != dp.scope or sp.agg != dp.agg or sp.model != dp.model
                    or (sp.scope == SC_WITHIN and (sp.window != dp.window or sp.keep != dp.keep))):
                raise ValueError("graft: the two leaves keep different state")
            if sp.scope == SC_WITHIN:
                w = _wstate(st.block, sp)
                dw = _wstate(dn.block, dp)
                n = dw.n
                size = sizeof(int64_t) if sp.agg == AG_COUNT else sizeof(WEntry)
                _reserve(w, n, size)
                if n:
                    memcpy(w.buf, dw.buf, n * size)
                w.n = <int32_t>n
                w.c_valid = False
                if sp.agg != AG_COUNT:
                    e = <WEntry*>w.buf
                    for i in range(n):
                        s = e[i].seq + shift
                        e[i].seq = s if s >= 4 else 4 + (e[i].seq & 3)
                continue
            ss = _sstate(st.block, sp)
            ds = _sstate(dn.block, dp)
            if sp.scope == SC_SESSION and not (same_session and ds.session == dn.session):
                _scalar_reset(sp, ss)
                ss.session = -1
                continue
            ss.count = ds.count
            if sp.scope == SC_SESSION:
                ss.session = st.session
            if sp.agg == AG_COUNT:
                continue
            ss.n_values = ds.n_values
            ss.vmin = ds.vmin
            ss.vmax = ds.vmax
            if sp.agg == AG_SUM or sp.agg == AG_AVG:
                _grow(<void**>&ss.sum.p, &ss.sum.cap, ds.sum.n, sizeof(double))
                if ds.sum.n:
                    memcpy(ss.sum.p, ds.sum.p, ds.sum.n * sizeof(double))
                ss.sum.n = ds.sum.n
                ss.sum.special = ds.sum.special
                ss.sum.inf = ds.sum.inf
                ss.sum.naive = ds.sum.naive
                ss.sum.failed = ds.sum.failed


# Sequence and absence leaves (issue 15): their state, evaluation and codec sections.
include "_sequences.pxi"
include "_sequences_plans.pxi"
include "_sequences_slots.pxi"
include "_sequences_keys.pxi"
include "_sequences_eval.pxi"
include "_sequences_codec.pxi"
include "_records.pxi"
