# Included by _evaluator.pyx.
#
# RecordScan: which records of a log to decode, chosen by their leading fields, read in place.
#
# A what-if replay (issue 15) walks the whole retained log but reads the events
# of a few models only: in the bench's log, 70% of a million records are page
# and product views that a checkout-abandoner audience never looks at. Decoding
# such a record with msgpack (its three maps included) only to throw it away
# cost about 1 us of the replay's 4; here the record's leading scalar fields are
# skipped over in place (a msgpack scalar's length is in its first bytes) until
# the kind, the name and the time are read, and only the records wanted are
# handed on, undecoded. The caller names the field positions, so this knows
# msgpack, not the log's layout.
#
# Cost: a comparison per wanted name (memcmp of a few bytes) per record; the
# records never become Python objects beyond the cursor's own (key, value).

cdef inline Py_ssize_t _mp_after(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The offset just after the msgpack scalar at ``i`` (-1: not a scalar, or past the end)."""
    cdef unsigned char b
    cdef Py_ssize_t j
    if i >= n:
        return -1
    b = p[i]
    if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
        return i + 1
    if 0xa0 <= b <= 0xbf:
        j = i + 1 + (b & 0x1f)
    elif b == 0xcc or b == 0xd0:
        j = i + 2
    elif b == 0xcd or b == 0xd1:
        j = i + 3
    elif b == 0xce or b == 0xd2 or b == 0xca:
        j = i + 5
    elif b == 0xcf or b == 0xd3 or b == 0xcb:
        j = i + 9
    elif b == 0xd9 or b == 0xc4:
        if i + 1 >= n:
            return -1
        j = i + 2 + p[i + 1]
    elif b == 0xda or b == 0xc5:
        if i + 2 >= n:
            return -1
        j = i + 3 + ((<Py_ssize_t>p[i + 1] << 8) | p[i + 2])
    elif b == 0xdb or b == 0xc6:
        if i + 4 >= n:
            return -1
        j = i + 5 + ((<Py_ssize_t>p[i + 1] << 24) | (<Py_ssize_t>p[i + 2] << 16) | (<Py_ssize_t>p[i + 3] << 8) | p[i + 4])
    else:
        return -1
    return j if j <= n else -1


cdef inline bint _mp_int(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, int64_t* out) noexcept:
    """The msgpack integer at ``i`` into ``out`` (False: not an integer that fits int64)."""
    cdef unsigned char b = p[i]
    cdef uint64_t u = 0
    cdef int k, size
    if b <= 0x7f:
        out[0] = b
        return True
    if b >= 0xe0:
        out[0] = <int64_t>(<signed char>b)
        return True
    if 0xcc <= b <= 0xcf:
        size = 1 << (b - 0xcc)
    elif 0xd0 <= b <= 0xd3:
        size = 1 << (b - 0xd0)
    else:
        return False
    if i + size >= n:
        return False
    for k in range(size):
        u = (u << 8) | p[i + 1 + k]
    if b <= 0xcf:
        if u > <uint64_t>INT64_MAX:
            return False
        out[0] = <int64_t>u
    elif size == 8:
        out[0] = <int64_t>u
    else:  # sign-extend the narrower two's complement
        out[0] = <int64_t>(u << (64 - 8 * size)) >> (64 - 8 * size)
    return True


cdef inline Py_ssize_t _mp_str(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* length) noexcept:
    """The offset of the msgpack string at ``i``'s bytes, its length in ``length`` (-1: not a string)."""
    cdef unsigned char b = p[i]
    if 0xa0 <= b <= 0xbf:
        length[0] = b & 0x1f
        return i + 1
    if b == 0xd9 and i + 1 < n:
        length[0] = p[i + 1]
        return i + 2
    if b == 0xda and i + 2 < n:
        length[0] = (<Py_ssize_t>p[i + 1] << 8) | p[i + 2]
        return i + 3
    if b == 0xdb and i + 4 < n:
        length[0] = ((<Py_ssize_t>p[i + 1] << 24) | (<Py_ssize_t>p[i + 2] << 16) | (<Py_ssize_t>p[i + 3] << 8)
                     | p[i + 4])
        return i + 5
    return -1


cdef class RecordScan:
    """Chooses the records of a log (msgpack arrays) by a kind, a name and a time among their leading fields.

    ``kind_field``, ``name_field``, ``time_field``: positions of an integer
    kind, a string name and an integer time, each before any map or array.
    A record is wanted when its (kind, name) is in ``named`` or its kind in
    ``kinds`` (``everything``: all are). ``scan`` stops before the first
    record whose time is ``until`` or later; ``read`` counts the records
    before it and ``first_time`` is the first one's time (None: none).
    """

    cdef int kind_field, name_field, time_field, last_field
    cdef int64_t until, _at  # _at: the time of the record _decide read last
    cdef bint everything
    cdef list _names  # the wanted names' UTF-8 bytes, which _name_ptr points into
    cdef int64_t* _name_kind
    cdef const unsigned char** _name_ptr
    cdef Py_ssize_t* _name_len
    cdef Py_ssize_t _n_named
    cdef int64_t* _kinds
    cdef Py_ssize_t _n_kinds
    cdef readonly int64_t read
    cdef readonly object first_time

    def __cinit__(self, int kind_field, int name_field, int time_field, named, kinds, bint everything,
                  int64_t until):
        cdef Py_ssize_t i
        cdef bytes raw
        self.kind_field, self.name_field, self.time_field = kind_field, name_field, time_field
        self.last_field = max(kind_field, name_field, time_field)
        self.until, self.everything, self.read, self.first_time = until, everything, 0, None
        named = sorted(named)
        kinds = sorted(kinds)
        self._names = [name.encode() for _, name in named]
        self._n_named, self._n_kinds = len(named), len(kinds)
        self._name_kind = <int64_t*>malloc((self._n_named + 1) * sizeof(int64_t))
        self._name_ptr = <const unsigned char**>malloc((self._n_named + 1) * sizeof(void*))
        self._name_len = <Py_ssize_t*>malloc((self._n_named + 1) * sizeof(Py_ssize_t))
        self._kinds = <int64_t*>malloc((self._n_kinds + 1) * sizeof(int64_t))
        if not (self._name_kind and self._name_ptr and self._name_len and self._kinds):
            raise MemoryError()
        for i in range(self._n_named):
            raw = self._names[i]
            self._name_kind[i] = named[i][0]
            self._name_ptr[i] = <const unsigned char*>PyBytes_AS_STRING(raw)
            self._name_len[i] = PyBytes_GET_SIZE(raw)
        for i in range(self._n_kinds):
            self._kinds[i] = kinds[i]

    def __dealloc__(self):
        free(self._name_kind)
        free(self._name_ptr)
        free(self._name_len)
        free(self._kinds)

    cdef int _decide(self, bytes record) except -1:
        """0: not wanted; 1: wanted; 2: at or past ``until`` (the scan ends)."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(record)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(record), i = 1, count, k, name_at = -1, name_len = 0
        cdef int64_t kind = 0, at = 0
        cdef unsigned char b
        if n == 0:
            raise ValueError("an empty record")
        b = p[0]
        if 0x90 <= b <= 0x9f:
            count = b & 0x0f
        elif b == 0xdc and n >= 3:
            count, i = (<Py_ssize_t>p[1] << 8) | p[2], 3
        else:
            raise ValueError("a record that is not a msgpack array")
        if count <= self.last_field:
            raise ValueError("a record shorter than its leading fields")
        for k in range(self.last_field + 1):
            if i >= n:
                raise ValueError("a truncated record")
            if k == self.kind_field and not _mp_int(p, i, n, &kind):
                raise ValueError("a record whose kind is not an integer")
            elif k == self.time_field and not _mp_int(p, i, n, &at):
                raise ValueError("a record whose time is not an integer")
            elif k == self.name_field:
                name_at = _mp_str(p, i, n, &name_len)
                if name_at < 0 or name_at + name_len > n:
                    raise ValueError("a record whose name is not a string")
            i = _mp_after(p, i, n)
            if i < 0:
                raise ValueError("a record whose leading fields are not scalars")
        if at >= self.until:
            return 2
        self._at = at
        if self.everything:
            return 1
        for k in range(self._n_kinds):
            if self._kinds[k] == kind:
                return 1
        for k in range(self._n_named):
            if (self._name_kind[k] == kind and self._name_len[k] == name_len
                    and memcmp(self._name_ptr[k], p + name_at, name_len) == 0):
                return 1
        return 0

    def scan(self, items, tick=None, int every=128):
        """Yields the wanted (key, value) items of ``items``, in order; calls ``tick()`` after every ``every`` read."""
        cdef int decided
        for item in items:
            decided = self._decide(<bytes?>item[1])
            if decided == 2:
                return
            if self.first_time is None:
                self.first_time = self._at
            self.read += 1
            if tick is not None and self.read % every == 0:
                tick()
            if decided:
                yield item
