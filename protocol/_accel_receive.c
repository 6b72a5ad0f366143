/* protocol._accel, receive: the MESSAGE frame scan and the receive batch.
 *
 * Same decisions as protocol/frame_decoder.py (scan_message_python) and
 * protocol/message.py (decode_message, decode_messages_python); tests/protocol/test_accel.py
 * holds the two to that.
 */
#include "_accel.h"
#include <structmember.h> /* T_OBJECT_EX */

/* -- receive: one whole, valid MESSAGE frame ------------------------------------------ */

static PyObject *empty_view; /* memoryview(b"") for the empty middle segment */

int accel_receive_init(void) {
    empty_view = PyMemoryView_FromMemory((char *)"", 0, PyBUF_READ);
    return empty_view ? 0 : -1;
}

/* One whole, valid MESSAGE frame at p (avail bytes): 1, 2 or 4 segments (empty middle),
 * every CRC correct. Returns its size, or 0 for "not on the fast path". */
static Py_ssize_t scan_one(const unsigned char *p, Py_ssize_t avail, Py_ssize_t seg_max,
                           Py_ssize_t data_max, unsigned *nseg_out, uint32_t *l0_out,
                           uint32_t *l1_out, uint32_t *l3_out) {
    if (avail < PREAMBLE_SIZE) return 0;
    unsigned tag = p[0], nseg = p[1];
    uint64_t l0 = rd32(p + 2), l1 = rd32(p + 8), l2 = rd32(p + 14), l3 = rd32(p + 20);
    if (tag != TAG_MESSAGE || l2 || !l0 || l0 > (uint64_t)seg_max) return 0;
    uint64_t total;
    if (nseg == 1) {
        if (l1 || l3) return 0;
        total = PREAMBLE_SIZE + 4 + l0;
    } else if (nseg == 2) {
        if (l3 || !l1 || l1 > (uint64_t)seg_max) return 0;
        total = PREAMBLE_SIZE + 4 + l0 + l1 + EPILOGUE_SIZE;
    } else if (nseg == 4) {
        if (!l3 || l1 > (uint64_t)seg_max || l3 > (uint64_t)data_max) return 0;
        total = PREAMBLE_SIZE + 4 + l0 + l1 + l3 + EPILOGUE_SIZE;
    } else {
        return 0;
    }
    if (total > (uint64_t)avail) return 0;
    if (CRC(0, p, 28) != rd32(p + 28)) return 0;
    const unsigned char *s0 = p + PREAMBLE_SIZE;
    if (CRC(MASK32, s0, l0) != rd32(s0 + l0)) return 0;
    const unsigned char *s1 = s0 + l0 + 4;
    if (nseg == 2) {
        const unsigned char *e = s1 + l1;
        if (e[0] != LATE_STATUS_COMPLETE || rd32(e + 5) || rd32(e + 9) ||
            CRC(MASK32, s1, l1) != rd32(e + 1))
            return 0;
    } else if (nseg == 4) {
        const unsigned char *s3 = s1 + l1, *e = s3 + l3;
        if (e[0] != LATE_STATUS_COMPLETE || rd32(e + 5) != MASK32 ||
            (l1 ? CRC(MASK32, s1, l1) : MASK32) != rd32(e + 1) || CRC(MASK32, s3, l3) != rd32(e + 9))
            return 0;
    }
    *nseg_out = nseg;
    *l0_out = (uint32_t)l0; *l1_out = (uint32_t)l1; *l3_out = (uint32_t)l3;
    return (Py_ssize_t)total;
}

/* The (mv, start, end, segment_max, data_max) arguments both receive functions start
 * with, parsed and checked: the buffer's bytes, or NULL with the error set. */
static const unsigned char *get_span(PyObject *const *args, Py_ssize_t *start,
                                     Py_ssize_t *end_avail, Py_ssize_t *seg_max,
                                     Py_ssize_t *data_max, const char *fn) {
    PyObject *mv = args[0];
    *start = PyLong_AsSsize_t(args[1]);
    *end_avail = PyLong_AsSsize_t(args[2]);
    *seg_max = PyLong_AsSsize_t(args[3]);
    *data_max = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (!PyMemoryView_Check(mv)) {
        PyErr_Format(PyExc_TypeError, "%s needs a memoryview", fn);
        return NULL;
    }
    Py_buffer *view = PyMemoryView_GET_BUFFER(mv);
    if (*start < 0 || *end_avail > view->len || *start > *end_avail) {
        PyErr_Format(PyExc_ValueError, "%s: start/end outside the buffer", fn);
        return NULL;
    }
    return (const unsigned char *)view->buf;
}

/* scan_message(mv, start, end, segment_max, data_max) -> (new_start, segments) | None
 *
 * The validation of FrameDecoder.next_message: a MESSAGE frame of 1, 2 or 4 segments
 * (empty middle) lying whole in mv[start:end], every CRC correct. None means "not on
 * the fast path": the caller's general decoder then decides, and words any error. */
PyObject *accel_scan_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "scan_message(mv, start, end, segment_max, data_max)");
        return NULL;
    }
    PyObject *mv = args[0];
    Py_ssize_t start, end_avail, seg_max, data_max;
    const unsigned char *base = get_span(args, &start, &end_avail, &seg_max, &data_max,
                                         "scan_message");
    if (!base) return NULL;
    unsigned nseg;
    uint32_t l0, l1, l3;
    Py_ssize_t total = scan_one(base + start, end_avail - start, seg_max, data_max,
                                &nseg, &l0, &l1, &l3);
    if (!total) Py_RETURN_NONE;
    Py_ssize_t o0 = start + PREAMBLE_SIZE;
    Py_ssize_t o1 = o0 + (Py_ssize_t)l0 + 4;
    PyObject *segs = PyTuple_New(nseg == 4 ? 4 : nseg);
    if (!segs) return NULL;
    PyObject *v = PySequence_GetSlice(mv, o0, o0 + (Py_ssize_t)l0);
    if (!v) goto fail;
    PyTuple_SET_ITEM(segs, 0, v);
    if (nseg > 1) {
        v = PySequence_GetSlice(mv, o1, o1 + (Py_ssize_t)l1);
        if (!v) goto fail;
        PyTuple_SET_ITEM(segs, 1, v);
    }
    if (nseg == 4) {
        Py_INCREF(empty_view);
        PyTuple_SET_ITEM(segs, 2, empty_view);
        Py_ssize_t o3 = o1 + (Py_ssize_t)l1;
        v = PySequence_GetSlice(mv, o3, o3 + (Py_ssize_t)l3);
        if (!v) goto fail;
        PyTuple_SET_ITEM(segs, 3, v);
    }
    return Py_BuildValue("(nN)", start + total, segs);
fail:
    Py_DECREF(segs);
    return NULL;
}

/* new_buffer(size) -> bytearray: receive memory, not zeroed. The decoder only ever
 * reads below the bytes the socket wrote (its _end), so zeroing a 256 KiB chunk per
 * rotation bought nothing. */
PyObject *accel_new_buffer(PyObject *self, PyObject *arg) {
    (void)self;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "new_buffer: negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

/* -- receive: a batch of messages -------------------------------------------------------- */

#define N_UNPACK_KW 8

/* set once by protocol.message (setup_decode): the Message class, msgpack.unpackb, the
 * exceptions that mean "not one valid msgpack object", and unpackb's keyword names */
static PyObject *message_cls, *unpackb, *unpack_errors, *unpack_kwnames;

/* Message's fields in __init__ order, then _front (init=False, default None). */
#define N_FIELDS 13
static const char *field_names[N_FIELDS] = {
    "type", "front", "data", "priority", "tid", "flags", "seq", "ack_seq", "raw", "middle",
    "version", "compat_version", "_front"};
/* Where each field's slot lies in a Message, when the class is exactly the slots
 * dataclass above (no other slots, every one an object slot): then a message is built
 * by filling its slots, what its __init__ does, without running the Python __init__.
 * 0 when it is not: the class is called instead. */
static Py_ssize_t field_offset[N_FIELDS];
static int fill_slots;

static int find_slots(PyObject *cls) {
    PyObject *slots = PyObject_GetAttrString(cls, "__slots__");
    if (!slots) { PyErr_Clear(); return 0; }
    int ok = PyTuple_Check(slots) && PyTuple_GET_SIZE(slots) == N_FIELDS &&
             PyType_Check(cls) && !PyObject_HasAttrString(cls, "__post_init__");
    for (int i = 0; ok && i < N_FIELDS; i++) {
        PyObject *name = PyTuple_GET_ITEM(slots, i);
        ok = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, field_names[i]) == 0;
        PyObject *d = ok ? PyObject_GetAttr(cls, name) : NULL;
        if (!d) { PyErr_Clear(); ok = 0; break; }
        ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok) field_offset[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
    }
    Py_DECREF(slots);
    return ok;
}

/* A Message from its 12 __init__ arguments (references stolen), _front None. */
static PyObject *new_message(PyObject *v[N_FIELDS - 1]) {
    PyObject *out;
    if (fill_slots) {
        PyTypeObject *tp = (PyTypeObject *)message_cls;
        out = tp->tp_alloc(tp, 0);
        if (out) {
            for (int i = 0; i < N_FIELDS - 1; i++) *(PyObject **)((char *)out + field_offset[i]) = v[i];
            *(PyObject **)((char *)out + field_offset[N_FIELDS - 1]) = Py_NewRef(Py_None);
            return out;
        }
    } else {
        out = PyObject_Vectorcall(message_cls, v, N_FIELDS - 1, NULL);
    }
    for (int i = 0; i < N_FIELDS - 1; i++) Py_DECREF(v[i]);
    return out;
}

PyObject *accel_setup_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1]) ||
        !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "setup_decode(message_class, unpackb, errors: tuple)");
        return NULL;
    }
    PyObject *names = Py_BuildValue("(ssssssss)", "raw", "strict_map_key", "use_list",
                                    "max_str_len", "max_bin_len", "max_array_len",
                                    "max_map_len", "max_ext_len");
    if (!names) return NULL;
    Py_XSETREF(unpack_kwnames, names);
    Py_INCREF(args[0]); Py_XSETREF(message_cls, args[0]);
    fill_slots = find_slots(args[0]);
    Py_INCREF(args[1]); Py_XSETREF(unpackb, args[1]);
    Py_INCREF(args[2]); Py_XSETREF(unpack_errors, args[2]);
    Py_RETURN_NONE;
}

/* The front of an asyncmsgr message: msgpack.unpackb with every limit bounded by the
 * segment's size (decode_message's call). NULL with no error set: not valid msgpack. */
static PyObject *unpack_front(PyObject *seg, Py_ssize_t size) {
    PyObject *lim = PyLong_FromSsize_t(size);
    if (!lim) return NULL;
    PyObject *argv[1 + N_UNPACK_KW] = {seg, Py_False, Py_False, Py_True, lim, lim, lim, lim, lim};
    PyObject *r = PyObject_Vectorcall(unpackb, argv, 1, unpack_kwnames);
    Py_DECREF(lim);
    if (!r && PyErr_ExceptionMatches(unpack_errors)) PyErr_Clear();
    return r;
}

/* The Message of the frame at base+off (already scanned), or NULL: with an error set on
 * failure, with none set when decode_message would refuse it (the caller stops there). */
static PyObject *decode_one(PyObject *mv, const unsigned char *base, Py_ssize_t off,
                            unsigned nseg, uint32_t l0, uint32_t l1, uint32_t l3,
                            Py_ssize_t max_front, int asyncmsgr, uint64_t *ack_out) {
    if (l0 != HEADER2_SIZE) return NULL;
    const unsigned char *h = base + off + PREAMBLE_SIZE;
    if (rd32(h + 22)) return NULL; /* data_pre_padding_len */
    Py_ssize_t fsize = nseg > 1 ? (Py_ssize_t)l1 : 0;
    if (fsize > max_front) return NULL;
    uint64_t seq = rd64(h), tid = rd64(h + 8), ack = rd64(h + 28);
    unsigned wtype = rd16(h + 16);
    Py_ssize_t o1 = off + PREAMBLE_SIZE + HEADER2_SIZE + 4;
    int raw = !asyncmsgr || wtype < ASYNCMSGR_TYPE_BASE;
    PyObject *front = NULL, *data = NULL, *out = NULL;
    if (raw) {
        front = PyBytes_FromStringAndSize((const char *)base + o1, fsize);
    } else if (fsize) {
        PyObject *seg = PySequence_GetSlice(mv, o1, o1 + fsize);
        if (!seg) return NULL;
        front = unpack_front(seg, fsize);
        Py_DECREF(seg);
    } else {
        front = Py_NewRef(Py_None);
    }
    if (!front) return NULL;
    if (nseg == 4) {
        Py_ssize_t o3 = o1 + fsize;
        data = PySequence_GetSlice(mv, o3, o3 + (Py_ssize_t)l3);
    } else {
        data = PyBytes_FromStringAndSize(NULL, 0);
    }
    PyObject *middle = PyBytes_FromStringAndSize(NULL, 0);
    /* Message(type, front, data, priority, tid, flags, seq, ack_seq, raw, middle,
     *         version, compat_version) */
    PyObject *v[N_FIELDS - 1] = {
        PyLong_FromUnsignedLong(raw ? wtype : wtype - ASYNCMSGR_TYPE_BASE), front, data,
        PyLong_FromUnsignedLong(rd16(h + 18)), PyLong_FromUnsignedLongLong(tid),
        PyLong_FromUnsignedLong(h[36]), PyLong_FromUnsignedLongLong(seq),
        PyLong_FromUnsignedLongLong(ack), Py_NewRef(raw ? Py_True : Py_False), middle,
        PyLong_FromUnsignedLong(rd16(h + 20)), PyLong_FromUnsignedLong(rd16(h + 37))};
    int ok = 1;
    for (int i = 0; i < N_FIELDS - 1; i++) ok = ok && v[i];
    if (!ok) {
        for (int i = 0; i < N_FIELDS - 1; i++) Py_XDECREF(v[i]);
        return NULL;
    }
    out = new_message(v);
    if (out) *ack_out = ack;
    return out;
}

/* decode_messages(mv, start, end, segment_max, data_max, max_front, asyncmsgr, limit)
 *     -> (messages, ends, max_ack)
 *
 * protocol.message.decode_messages_python, compiled: up to ``limit`` consecutive whole
 * MESSAGE frames from mv[start:end], each scanned as scan_message does and decoded as
 * decode_message does; ends[i] is the offset after messages[i]. It stops, consuming
 * nothing itself, at the first frame either of them would not take: the general decoder
 * then handles that frame and words any error. */
PyObject *accel_decode_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "decode_messages(mv, start, end, segment_max, "
                                         "data_max, max_front, asyncmsgr, limit)");
        return NULL;
    }
    if (!message_cls) {
        PyErr_SetString(PyExc_RuntimeError, "decode_messages before setup_decode");
        return NULL;
    }
    PyObject *mv = args[0];
    Py_ssize_t start, end_avail, seg_max, data_max;
    const unsigned char *base = get_span(args, &start, &end_avail, &seg_max, &data_max,
                                         "decode_messages");
    if (!base) return NULL;
    Py_ssize_t max_front = PyLong_AsSsize_t(args[5]);
    int asyncmsgr = PyObject_IsTrue(args[6]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[7]);
    if (PyErr_Occurred()) return NULL;
    PyObject *msgs = PyList_New(0), *ends = PyList_New(0);
    if (!msgs || !ends) goto fail;
    uint64_t max_ack = 0;
    Py_ssize_t off = start;
    for (Py_ssize_t n = 0; n < limit; n++) {
        unsigned nseg;
        uint32_t l0, l1, l3;
        Py_ssize_t total = scan_one(base + off, end_avail - off, seg_max, data_max,
                                    &nseg, &l0, &l1, &l3);
        if (!total) break;
        uint64_t ack = 0;
        PyObject *msg = decode_one(mv, base, off, nseg, l0, l1, l3, max_front, asyncmsgr, &ack);
        if (!msg) {
            if (PyErr_Occurred()) goto fail;
            break;
        }
        off += total;
        PyObject *e = PyLong_FromSsize_t(off);
        int bad = !e || PyList_Append(msgs, msg) < 0 || PyList_Append(ends, e) < 0;
        Py_DECREF(msg);
        Py_XDECREF(e);
        if (bad) goto fail;
        if (ack > max_ack) max_ack = ack;
    }
    return Py_BuildValue("(NNK)", msgs, ends, (unsigned long long)max_ack);
fail:
    Py_XDECREF(msgs);
    Py_XDECREF(ends);
    return NULL;
}

