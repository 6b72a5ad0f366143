/* protocol._accel: the compiled twin of the per-message msgr2.1 frame path.
 *
 * Same bytes and the same decisions as the pure-Python reference in protocol/frames.py
 * (FrameDecoder.next_message, encode_message_frame) and protocol/crc.py; the differential
 * tests in tests/protocol/test_accel.py hold the two to that. Python stays the reference:
 * everything rare (control frames, big frames, errors and their wording) is left to it.
 *
 * CRC-32C: the SSE4.2 crc32 instruction where the CPU has it (checked once at import with
 * __builtin_cpu_supports), else slicing-by-8 tables built at import. Raw semantics, as
 * Ceph's ceph_crc32c: the seed is the register's start value and the register is
 * returned without inversion.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PREAMBLE_SIZE 32
#define EPILOGUE_SIZE 13
#define TAG_MESSAGE 17
#define LATE_STATUS_COMPLETE 0x0E
#define ALIGN_DEFAULT 8
#define ALIGN_DATA 4096
#define SMALL_DATA 4096 /* data up to this size is joined into the frame buffer */
#define MASK32 0xFFFFFFFFu

/* -- CRC-32C -------------------------------------------------------------------------- */

static uint32_t crc_table[8][256];
static int have_sse42;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_sw(uint32_t crc, const unsigned char *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) { crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8); n--; }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc; /* little-endian hosts only: setup.py builds this for them */
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^
              crc_table[5][(w >> 16) & 0xFF] ^ crc_table[4][(w >> 24) & 0xFF] ^
              crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
              crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
        p += 8; n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) { c = __builtin_ia32_crc32qi((uint32_t)c, *p++); n--; }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8; n -= 8;
    }
    while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#define CRC(seed, p, n) (have_sse42 ? crc_hw((seed), (p), (n)) : crc_sw((seed), (p), (n)))
#else
#define CRC(seed, p, n) crc_sw((seed), (p), (n))
#endif

static inline uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void wr32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

static inline void wr16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
}

/* crc32c(data, seed) -> int: raw CRC-32C of data from register value seed. */
static PyObject *py_crc32c(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    unsigned long seed;
    if (!PyArg_ParseTuple(args, "y*k:crc32c", &buf, &seed)) return NULL;
    if (seed > MASK32) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "crc32c seed must fit in 32 bits");
        return NULL;
    }
    uint32_t c;
    Py_BEGIN_ALLOW_THREADS
    c = CRC((uint32_t)seed, (const unsigned char *)buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(c);
}

/* -- receive: one whole, valid MESSAGE frame ------------------------------------------ */

static PyObject *empty_view; /* memoryview(b"") for the empty middle segment */

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
static PyObject *py_scan_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* -- receive: a batch of messages -------------------------------------------------------- */

#define HEADER2_SIZE 41 /* ceph_msg_header2, packed: "<QQHHHIHQBHH" */
#define ASYNCMSGR_TYPE_BASE 0x8000
#define N_UNPACK_KW 8

/* set once by protocol.message (setup_decode): the Message class, msgpack.unpackb, the
 * exceptions that mean "not one valid msgpack object", and unpackb's keyword names */
static PyObject *message_cls, *unpackb, *unpack_errors, *unpack_kwnames;

static PyObject *py_setup_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
    Py_INCREF(args[1]); Py_XSETREF(unpackb, args[1]);
    Py_INCREF(args[2]); Py_XSETREF(unpack_errors, args[2]);
    Py_RETURN_NONE;
}

static inline uint64_t rd64(const unsigned char *p) {
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

static inline uint16_t rd16(const unsigned char *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
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
    PyObject *f[10] = {
        PyLong_FromUnsignedLong(raw ? wtype : wtype - ASYNCMSGR_TYPE_BASE),
        PyLong_FromUnsignedLong(rd16(h + 18)), PyLong_FromUnsignedLongLong(tid),
        PyLong_FromUnsignedLong(h[36]), PyLong_FromUnsignedLongLong(seq),
        PyLong_FromUnsignedLongLong(ack), PyLong_FromUnsignedLong(rd16(h + 20)),
        PyLong_FromUnsignedLong(rd16(h + 37)), NULL, NULL};
    int ok = data && middle;
    for (int i = 0; i < 8; i++) ok = ok && f[i];
    if (ok) {
        /* Message(type, front, data, priority, tid, flags, seq, ack_seq, raw, middle,
         *         version, compat_version) */
        PyObject *argv[12] = {f[0], front, data, f[1], f[2], f[3], f[4], f[5],
                              raw ? Py_True : Py_False, middle, f[6], f[7]};
        out = PyObject_Vectorcall(message_cls, argv, 12, NULL);
        if (out) *ack_out = ack;
    }
    for (int i = 0; i < 8; i++) Py_XDECREF(f[i]);
    Py_DECREF(front);
    Py_XDECREF(data);
    Py_XDECREF(middle);
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
static PyObject *py_decode_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* The frame of a message without a middle segment, byte for byte what
 * protocol.frames.encode_message_frame returns: one bytes object, or for data over
 * SMALL_DATA [head bytes, data itself (not copied), epilogue bytes]. */
static PyObject *build_frame(const unsigned char *hdr, Py_ssize_t hlen, const Py_buffer *f,
                             const Py_buffer *d, PyObject *data_obj) {
    if (hlen > MASK32 || f->len > MASK32 || d->len > MASK32) {
        PyErr_SetString(PyExc_OverflowError, "a frame segment is limited to 4 GiB - 1");
        return NULL;
    }
    uint32_t l0 = (uint32_t)hlen, l1 = (uint32_t)f->len, l3 = (uint32_t)d->len;
    unsigned nseg = l3 ? 4 : (l1 ? 2 : 1);
    int split = l3 > SMALL_DATA;
    Py_ssize_t size = PREAMBLE_SIZE + l0 + 4 + (nseg > 1 ? l1 : 0);
    if (nseg > 1 && !split) size += l3 + EPILOGUE_SIZE;
    PyObject *head = PyBytes_FromStringAndSize(NULL, size), *epi = NULL, *out;
    if (!head) return NULL;
    unsigned char *b = (unsigned char *)PyBytes_AS_STRING(head);
    put_preamble(b, nseg, l0, l1, l3);
    unsigned char *q = b + PREAMBLE_SIZE;
    if (l0) memcpy(q, hdr, l0);
    wr32(q + l0, CRC(MASK32, hdr, l0));
    q += l0 + 4;
    uint32_t c1 = 0, c3 = 0;
    if (nseg > 1) {
        if (l1) memcpy(q, f->buf, l1);
        q += l1;
        c1 = l1 ? CRC(MASK32, (const unsigned char *)f->buf, l1) : MASK32;
    }
    if (nseg == 4) c3 = CRC(MASK32, (const unsigned char *)d->buf, l3);
    if (nseg == 2) {
        put_epilogue(q, c1, 0, 0);
    } else if (nseg == 4 && !split) {
        memcpy(q, d->buf, l3);
        put_epilogue(q + l3, c1, MASK32, c3);
    } else if (nseg == 4) {
        epi = PyBytes_FromStringAndSize(NULL, EPILOGUE_SIZE);
        if (!epi) { Py_DECREF(head); return NULL; }
        put_epilogue((unsigned char *)PyBytes_AS_STRING(epi), c1, MASK32, c3);
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
static PyObject *py_encode_message_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* encode_message(seq, tid, type, priority, version, ack_seq, flags, compat, front, data)
 *
 * ceph_msg_header2 packed as protocol.message packs it, then its frame (no middle).
 * A field out of range raises OverflowError (TypeError for a non-int): the caller then
 * asks the Python packer, which names the field. */
static PyObject *py_encode_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "encode_message(seq, tid, type, priority, version, "
                                         "ack_seq, flags, compat, front, data)");
        return NULL;
    }
    static const unsigned long long max[8] = {
        0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull, 0xFFFF, 0xFFFF, 0xFFFF,
        0xFFFFFFFFFFFFFFFFull, 0xFF, 0xFFFF};
    unsigned long long v[8];
    for (int i = 0; i < 8; i++)
        if (get_uint(args[i], max[i], &v[i]) < 0) return NULL;
    unsigned char hdr[HEADER2_SIZE];
    memset(hdr, 0, sizeof hdr);
    for (int i = 0; i < 8; i++) { hdr[i] = (unsigned char)(v[0] >> (8 * i)); hdr[8 + i] = (unsigned char)(v[1] >> (8 * i)); }
    wr16(hdr + 16, (uint16_t)v[2]);
    wr16(hdr + 18, (uint16_t)v[3]);
    wr16(hdr + 20, (uint16_t)v[4]);
    /* data_pre_padding_len (u32 @22) and data_off (u16 @26) are 0 */
    for (int i = 0; i < 8; i++) hdr[28 + i] = (unsigned char)(v[5] >> (8 * i));
    hdr[36] = (unsigned char)v[6];
    wr16(hdr + 37, (uint16_t)v[7]);
    /* reserved (u16 @39) is 0 */
    Py_buffer f, d;
    if (PyObject_GetBuffer(args[8], &f, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[9], &d, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&f); return NULL; }
    PyObject *out = build_frame(hdr, HEADER2_SIZE, &f, &d, args[9]);
    PyBuffer_Release(&f); PyBuffer_Release(&d);
    return out;
}

static PyMethodDef methods[] = {
    {"crc32c", py_crc32c, METH_VARARGS,
     "crc32c(data, seed) -> int: raw CRC-32C (Ceph's ceph_crc32c) of data from seed."},
    {"scan_message", (PyCFunction)(void (*)(void))py_scan_message, METH_FASTCALL,
     "scan_message(mv, start, end, segment_max, data_max) -> (new_start, segments) | None"},
    {"decode_messages", (PyCFunction)(void (*)(void))py_decode_messages, METH_FASTCALL,
     "decode_messages(mv, start, end, segment_max, data_max, max_front, asyncmsgr, limit)"
     " -> (messages, ends, max_ack)"},
    {"setup_decode", (PyCFunction)(void (*)(void))py_setup_decode, METH_FASTCALL,
     "setup_decode(message_class, unpackb, errors): what decode_messages builds and calls."},
    {"encode_message_frame", (PyCFunction)(void (*)(void))py_encode_message_frame, METH_FASTCALL,
     "encode_message_frame(header, front, data) -> list: one MESSAGE frame, no middle."},
    {"encode_message", (PyCFunction)(void (*)(void))py_encode_message, METH_FASTCALL,
     "encode_message(seq, tid, type, priority, version, ack_seq, flags, compat, front, data)"
     " -> list: ceph_msg_header2 and its MESSAGE frame, no middle."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "protocol._accel",
    "Compiled twin of the per-message msgr2.1 frame path (see protocol/accel.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__accel(void) {
    crc_init();
    empty_view = PyMemoryView_FromMemory((char *)"", 0, PyBUF_READ);
    if (!empty_view) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddStringConstant(m, "CRC_IMPL", have_sse42 ? "sse4.2" : "table") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
