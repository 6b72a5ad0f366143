/* protocol._accel, send: MESSAGE frames, one at a time or a batch into one buffer.
 *
 * Same bytes as protocol/frame_encoder.py (encode_message_frame_python) and
 * protocol/message.py (_pack, encode_messages); tests/protocol/test_accel.py holds the two
 * to that.
 */
#include "_accel.h"

/* -- send: one MESSAGE frame --------------------------------------------------------- */

static void put_preamble(unsigned char *b, unsigned nseg, uint32_t l0, uint32_t l1, uint32_t l3) {
    memset(b, 0, PREAMBLE_SIZE);
    b[0] = TAG_MESSAGE;
    b[1] = (unsigned char)nseg;
    wr32(b + 2, l0); wr16(b + 6, ALIGN_DEFAULT);
    if (nseg > 1) { wr32(b + 8, l1); wr16(b + 12, ALIGN_DEFAULT); }
    if (nseg == 4) { wr16(b + 18, ALIGN_DEFAULT); wr32(b + 20, l3); wr16(b + 24, ALIGN_DATA); }
    wr32(b + 28, CRC(0, b, 28));
}

static void put_epilogue(unsigned char *e, uint32_t c1, uint32_t c2, uint32_t c3) {
    e[0] = LATE_STATUS_COMPLETE;
    wr32(e + 1, c1); wr32(e + 5, c2); wr32(e + 9, c3);
}

/* The layout of a frame without a middle segment: its segment count, whether its data
 * goes out as its own buffer (over SMALL_DATA: not copied), and the size of the part
 * written in one piece (all of it, or up to the data when split). */
typedef struct {
    uint32_t l0, l1, l3;
    unsigned nseg;
    int split;
    Py_ssize_t head;
} layout_t;

static int frame_layout(Py_ssize_t hlen, Py_ssize_t flen, Py_ssize_t dlen, layout_t *lo) {
    if (hlen > MASK32 || flen > MASK32 || dlen > MASK32) {
        PyErr_SetString(PyExc_OverflowError, "a frame segment is limited to 4 GiB - 1");
        return -1;
    }
    lo->l0 = (uint32_t)hlen; lo->l1 = (uint32_t)flen; lo->l3 = (uint32_t)dlen;
    lo->nseg = lo->l3 ? 4 : (lo->l1 ? 2 : 1);
    lo->split = lo->l3 > SMALL_DATA;
    lo->head = PREAMBLE_SIZE + lo->l0 + 4 + (lo->nseg > 1 ? lo->l1 : 0);
    if (lo->nseg > 1 && !lo->split) lo->head += lo->l3 + EPILOGUE_SIZE;
    return 0;
}

/* Write the frame's first piece (lo->head bytes) at b; for a split frame, *epi gets the
 * epilogue that follows the data. */
static void write_frame(unsigned char *b, const layout_t *lo, const unsigned char *hdr,
                        const unsigned char *front, const unsigned char *data,
                        unsigned char epi[EPILOGUE_SIZE]) {
    uint32_t l0 = lo->l0, l1 = lo->l1, l3 = lo->l3;
    put_preamble(b, lo->nseg, l0, l1, l3);
    unsigned char *q = b + PREAMBLE_SIZE;
    if (l0) memcpy(q, hdr, l0);
    wr32(q + l0, CRC(MASK32, hdr, l0));
    q += l0 + 4;
    uint32_t c1 = 0, c3 = 0;
    if (lo->nseg > 1) {
        if (l1) memcpy(q, front, l1);
        q += l1;
        c1 = l1 ? CRC(MASK32, front, l1) : MASK32;
    }
    if (lo->nseg == 4) c3 = CRC(MASK32, data, l3);
    if (lo->nseg == 2) {
        put_epilogue(q, c1, 0, 0);
    } else if (lo->nseg == 4 && !lo->split) {
        memcpy(q, data, l3);
        put_epilogue(q + l3, c1, MASK32, c3);
    } else if (lo->nseg == 4) {
        put_epilogue(epi, c1, MASK32, c3);
    }
}

/* The frame of a message without a middle segment, byte for byte what
 * protocol.frames.encode_message_frame returns: one bytes object, or for data over
 * SMALL_DATA [head bytes, data itself (not copied), epilogue bytes]. */
static PyObject *build_frame(const unsigned char *hdr, Py_ssize_t hlen, const Py_buffer *f,
                             const Py_buffer *d, PyObject *data_obj) {
    layout_t lo;
    if (frame_layout(hlen, f->len, d->len, &lo) < 0) return NULL;
    unsigned char e[EPILOGUE_SIZE];
    PyObject *head = PyBytes_FromStringAndSize(NULL, lo.head), *epi = NULL, *out;
    if (!head) return NULL;
    write_frame((unsigned char *)PyBytes_AS_STRING(head), &lo, hdr, f->buf, d->buf, e);
    if (lo.split) {
        epi = PyBytes_FromStringAndSize((const char *)e, EPILOGUE_SIZE);
        if (!epi) { Py_DECREF(head); return NULL; }
    }
    out = PyList_New(epi ? 3 : 1);
    if (!out) { Py_DECREF(head); Py_XDECREF(epi); return NULL; }
    PyList_SET_ITEM(out, 0, head);
    if (epi) {
        Py_INCREF(data_obj);
        PyList_SET_ITEM(out, 1, data_obj);
        PyList_SET_ITEM(out, 2, epi);
    }
    return out;
}

/* encode_message_frame(header, front, data) -> list of buffers */
PyObject *accel_encode_message_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode_message_frame(header, front, data)");
        return NULL;
    }
    Py_buffer h, f, d;
    if (PyObject_GetBuffer(args[0], &h, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &f, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&h); return NULL; }
    if (PyObject_GetBuffer(args[2], &d, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&h); PyBuffer_Release(&f); return NULL;
    }
    PyObject *out = build_frame((const unsigned char *)h.buf, h.len, &f, &d, args[2]);
    PyBuffer_Release(&h); PyBuffer_Release(&f); PyBuffer_Release(&d);
    return out;
}

static int get_uint(PyObject *o, unsigned long long max, unsigned long long *v) {
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "message header fields are ints");
        return -1;
    }
    *v = PyLong_AsUnsignedLongLong(o);
    if (*v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (*v > max) {
        PyErr_SetString(PyExc_OverflowError, "message header field out of range");
        return -1;
    }
    return 0;
}

/* ceph_msg_header2 from v = (seq, tid, type, priority, version, ack_seq, flags, compat),
 * packed as protocol.message._pack packs it ("<QQHHHIHQBHH", padding/data_off 0). */
static void pack_header(unsigned char hdr[HEADER2_SIZE], const unsigned long long v[8]) {
    memset(hdr, 0, HEADER2_SIZE);
    for (int i = 0; i < 8; i++) { hdr[i] = (unsigned char)(v[0] >> (8 * i)); hdr[8 + i] = (unsigned char)(v[1] >> (8 * i)); }
    wr16(hdr + 16, (uint16_t)v[2]);
    wr16(hdr + 18, (uint16_t)v[3]);
    wr16(hdr + 20, (uint16_t)v[4]);
    /* data_pre_padding_len (u32 @22) and data_off (u16 @26) are 0 */
    for (int i = 0; i < 8; i++) hdr[28 + i] = (unsigned char)(v[5] >> (8 * i));
    hdr[36] = (unsigned char)v[6];
    wr16(hdr + 37, (uint16_t)v[7]);
    /* reserved (u16 @39) is 0 */
}

static const unsigned long long header_max[8] = {
    0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull, 0xFFFF, 0xFFFF, 0xFFFF,
    0xFFFFFFFFFFFFFFFFull, 0xFF, 0xFFFF};

/* encode_message(seq, tid, type, priority, version, ack_seq, flags, compat, front, data)
 *
 * ceph_msg_header2 packed as protocol.message packs it, then its frame (no middle).
 * A field out of range raises OverflowError (TypeError for a non-int): the caller then
 * asks the Python packer, which names the field. */
PyObject *accel_encode_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "encode_message(seq, tid, type, priority, version, "
                                         "ack_seq, flags, compat, front, data)");
        return NULL;
    }
    unsigned long long v[8];
    for (int i = 0; i < 8; i++)
        if (get_uint(args[i], header_max[i], &v[i]) < 0) return NULL;
    unsigned char hdr[HEADER2_SIZE];
    pack_header(hdr, v);
    Py_buffer f, d;
    if (PyObject_GetBuffer(args[8], &f, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[9], &d, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&f); return NULL; }
    PyObject *out = build_frame(hdr, HEADER2_SIZE, &f, &d, args[9]);
    PyBuffer_Release(&f); PyBuffer_Release(&d);
    return out;
}


/* -- send: a batch ------------------------------------------------------------------------- */

/* Message attributes the batch reads, in header order, then the rest. */
enum { A_SEQ, A_TID, A_TYPE, A_PRIORITY, A_VERSION, A_ACK_SEQ, A_FLAGS, A_COMPAT,
       A_RAW, A_MIDDLE, A_FRONT, A_DATA, N_ATTRS };
static PyObject *attr_names[N_ATTRS];

int accel_send_init(void) {
    static const char *names[N_ATTRS] = {"seq", "tid", "type", "priority", "version",
                                         "ack_seq", "flags", "compat_version", "raw",
                                         "middle", "_front", "data"};
    for (int i = 0; i < N_ATTRS; i++)
        if (!(attr_names[i] = PyUnicode_InternFromString(names[i]))) return -1;
    return 0;
}

/* Frames joined into one bytes object, written in place: a buffer sized for the frames
 * left (if they are like this one; JOINED_MIN to JOINED_CAP, at least one frame's head) is
 * filled and, once the next piece does not fit, trimmed to what it holds and appended
 * to `out`. Each byte is copied once, into it. */
#define JOINED_CAP (64 * 1024)
#define JOINED_MIN 4096
typedef struct { PyObject *b; Py_ssize_t len, left; } joined_t;

static int joined_flush(joined_t *j, PyObject *out) {
    if (!j->b) return 0;
    PyObject *b = j->b;
    j->b = NULL;
    if (j->len != PyBytes_GET_SIZE(b) && _PyBytes_Resize(&b, j->len) < 0) return -1;
    int r = PyList_Append(out, b);
    Py_DECREF(b);
    return r;
}

static unsigned char *joined_room(joined_t *j, Py_ssize_t n, PyObject *out) {
    if (j->b && j->len + n > PyBytes_GET_SIZE(j->b) && joined_flush(j, out) < 0) return NULL;
    if (!j->b) {
        Py_ssize_t cap = j->left > JOINED_CAP / n ? JOINED_CAP : j->left * n;
        cap = cap < JOINED_MIN ? JOINED_MIN : cap;
        if (!(j->b = PyBytes_FromStringAndSize(NULL, cap > n ? cap : n))) return NULL;
        j->len = 0;
    }
    unsigned char *at = (unsigned char *)PyBytes_AS_STRING(j->b) + j->len;
    j->len += n;
    return at;
}

/* Encode one message into j (and out, for split data). 1: done; 0: not for the batch
 * (the Python path takes it, and words any error); -1: error set. */
static int batch_one(PyObject *msg, int asyncmsgr, joined_t *j, PyObject *out) {
    PyObject *a[N_ATTRS] = {NULL};
    int r = 0;
    for (int i = 0; i < N_ATTRS; i++)
        if (!(a[i] = PyObject_GetAttr(msg, attr_names[i]))) goto refuse;
    int raw = a[A_RAW] == Py_True;
    if ((!raw && a[A_RAW] != Py_False) || (!raw && !asyncmsgr)) goto done;
    if (!PyBytes_CheckExact(a[A_FRONT])) goto done; /* front not encoded yet */
    if (!PyBytes_CheckExact(a[A_MIDDLE]) || PyBytes_GET_SIZE(a[A_MIDDLE])) goto done;
    unsigned long long v[8];
    for (int i = 0; i < 8; i++)
        if (get_uint(a[i], header_max[i], &v[i]) < 0) goto refuse;
    if (!raw) {
        if (v[A_TYPE] > 0x7FFF) goto done;
        v[A_TYPE] += ASYNCMSGR_TYPE_BASE;
    }
    Py_buffer d;
    if (PyObject_GetBuffer(a[A_DATA], &d, PyBUF_SIMPLE) < 0) goto refuse;
    unsigned char hdr[HEADER2_SIZE], epi[EPILOGUE_SIZE];
    pack_header(hdr, v);
    layout_t lo;
    unsigned char *at;
    if (frame_layout(HEADER2_SIZE, PyBytes_GET_SIZE(a[A_FRONT]), d.len, &lo) < 0 ||
        !(at = joined_room(j, lo.head, out))) {
        PyBuffer_Release(&d);
        r = -1;
        goto done;
    }
    write_frame(at, &lo, hdr, (const unsigned char *)PyBytes_AS_STRING(a[A_FRONT]), d.buf, epi);
    PyBuffer_Release(&d);
    r = 1;
    if (lo.split) {  /* [joined so far + head] [data, not copied] [epilogue ...] */
        if (joined_flush(j, out) < 0 || PyList_Append(out, a[A_DATA]) < 0 ||
            !(at = joined_room(j, EPILOGUE_SIZE, out)))
            r = -1;
        else
            memcpy(at, epi, EPILOGUE_SIZE);
    }
    goto done;
refuse: /* a missing attribute or a field out of range: the Python path says which */
    if (PyErr_ExceptionMatches(PyExc_MemoryError)) r = -1; else PyErr_Clear();
done:
    for (int i = 0; i < N_ATTRS; i++) Py_XDECREF(a[i]);
    return r;
}

/* encode_batch(messages, start, asyncmsgr, out) -> int
 *
 * The MESSAGE frames of messages[start:] (numbered by the session), byte for byte what
 * protocol.message.encode_messages appends, appended to out with consecutive small
 * frames joined into one bytes object (data over SMALL_DATA stays its own buffer).
 * It stops at the first message the Python path must take (a middle segment, a front
 * not yet encoded, a field out of range, an asyncmsgr message for a Ceph peer) and
 * returns its index; len(messages) when all were encoded. */
PyObject *accel_encode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "encode_batch(messages: list, start, asyncmsgr, out: list)");
        return NULL;
    }
    PyObject *msgs = args[0], *out = args[3];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    int asyncmsgr = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (i < 0) i = 0;
    joined_t j = {NULL, 0, 0};
    int r = 1;
    for (; i < PyList_GET_SIZE(msgs); i++) {
        j.left = PyList_GET_SIZE(msgs) - i;
        r = batch_one(PyList_GET_ITEM(msgs, i), asyncmsgr, &j, out);
        if (r <= 0) break;
    }
    if (r >= 0 && joined_flush(&j, out) < 0) r = -1;
    Py_XDECREF(j.b);
    return r < 0 ? NULL : PyLong_FromSsize_t(i);
}

/* -- send: the check at queue time ----------------------------------------------------------- */

static PyObject *packb; /* msgpack.packb, set once by protocol.message (setup_encode) */
static PyObject *check_python; /* protocol.message.check_outgoing_python: words the errors */
static PyObject *packb_kwnames, *front_name, *ceph_peer_name;

PyObject *accel_setup_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setup_encode(packb, check_outgoing_python)");
        return NULL;
    }
    if (!packb_kwnames && !(packb_kwnames = Py_BuildValue("(s)", "use_bin_type"))) return NULL;
    if (!front_name && (!(front_name = PyUnicode_InternFromString("front")) ||
                        !(ceph_peer_name = PyUnicode_InternFromString("ceph_peer"))))
        return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(packb, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(check_python, args[1]);
    Py_RETURN_NONE;
}

/* The front segment as Message.encoded_front makes it, or NULL with no error set where
 * that would raise (the Python path then says why). */
static PyObject *encode_front(PyObject *front, int raw) {
    if (front == Py_None) return PyBytes_FromStringAndSize(NULL, 0);
    if (raw) {
        if (PyBytes_CheckExact(front)) return Py_NewRef(front);
        if (PyByteArray_Check(front) || PyMemoryView_Check(front) || PyBytes_Check(front)) {
            PyObject *b = PyBytes_FromObject(front);
            if (!b) PyErr_Clear();
            return b;
        }
        return NULL;
    }
    PyObject *argv[2] = {front, Py_True};
    PyObject *b = PyObject_Vectorcall(packb, argv, 1, packb_kwnames);
    if (!b || !PyBytes_CheckExact(b)) { PyErr_Clear(); Py_XDECREF(b); return NULL; }
    return b;
}

/* 1: every header field the sender sets is in range and the front is encoded (and
 * cached in msg._front, as encoded_front caches it); 0: check_outgoing_python must look
 * (an asyncmsgr message for a Ceph peer, a field out of range or not an int, a front
 * this cannot encode), nothing changed; -1: error set. */
static int vouch(PyObject *msg, int ceph_peer) {
    PyObject *a[N_ATTRS] = {NULL};
    PyObject *front = NULL, *enc = NULL;
    int result = 0;
    /* the header fields check_outgoing packs (seq and ack_seq are the session's) */
    static const int checked[] = {A_TID, A_TYPE, A_PRIORITY, A_VERSION, A_FLAGS, A_COMPAT};
    for (size_t k = 0; k < sizeof checked / sizeof checked[0]; k++)
        if (!(a[checked[k]] = PyObject_GetAttr(msg, attr_names[checked[k]]))) goto refuse;
    if (!(a[A_RAW] = PyObject_GetAttr(msg, attr_names[A_RAW])) ||
        !(a[A_FRONT] = PyObject_GetAttr(msg, attr_names[A_FRONT])))
        goto refuse;
    int raw = a[A_RAW] == Py_True;
    if (!raw && a[A_RAW] != Py_False) goto done;
    if (!raw && ceph_peer) goto done; /* an asyncmsgr message for a Ceph peer */
    for (size_t k = 0; k < sizeof checked / sizeof checked[0]; k++) {
        unsigned long long v;
        int i = checked[k];
        if (i == A_TYPE && !raw && !PyLong_CheckExact(a[i])) goto done; /* e.g. a bool */
        if (get_uint(a[i], header_max[i], &v) < 0) goto refuse;
        if (i == A_TYPE && !raw && v > 0x7FFF) goto done;
    }
    if (a[A_FRONT] == Py_None) { /* not encoded yet: encode and cache it */
        if (!(front = PyObject_GetAttr(msg, front_name))) goto refuse;
        if (!(enc = encode_front(front, raw))) goto done;
        if (PyObject_SetAttr(msg, attr_names[A_FRONT], enc) < 0) goto refuse;
    } else if (!PyBytes_CheckExact(a[A_FRONT])) {
        goto done;
    }
    result = 1;
    goto done;
refuse:
    if (PyErr_ExceptionMatches(PyExc_MemoryError)) result = -1; else PyErr_Clear();
done:
    for (int i = 0; i < N_ATTRS; i++) Py_XDECREF(a[i]);
    Py_XDECREF(front);
    Py_XDECREF(enc);
    return result;
}

/* check_outgoing(msg, ceph_peer=False) -> None
 *
 * protocol.message.check_outgoing, compiled: returns at once for a message it can vouch
 * for; anything else goes to check_outgoing_python, which raises the worded
 * LocalProtocolError (or finds nothing wrong), so every message is judged as before. */
PyObject *accel_check_outgoing(PyObject *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames) {
    (void)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *peer = nargs > 1 ? args[1] : Py_False;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < 1 || nargs + nkw > 2 || (nkw && (nargs != 1 ||
            PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), ceph_peer_name) != 0))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "check_outgoing(msg, ceph_peer=False)");
        return NULL;
    }
    if (nkw) peer = args[1];
    if (!check_python) {
        PyErr_SetString(PyExc_RuntimeError, "check_outgoing before setup_encode");
        return NULL;
    }
    int ceph_peer = PyObject_IsTrue(peer);
    if (ceph_peer < 0) return NULL;
    int r = vouch(args[0], ceph_peer);
    if (r < 0) return NULL;
    if (r) Py_RETURN_NONE;
    PyObject *argv[2] = {args[0], ceph_peer ? Py_True : Py_False};
    return PyObject_Vectorcall(check_python, argv, 2, NULL);
}
