/* protocol._accel: the compiled twin of the per-message msgr2.1 path; this file holds
 * CRC-32C and the module, _accel_receive.c and _accel_send.c the two directions.
 *
 * Same bytes and the same decisions as the pure-Python reference (protocol/crc.py,
 * frame_decoder.py, frame_encoder.py, message.py); the differential tests in
 * tests/protocol/test_accel.py hold the two to that. Python stays the reference:
 * everything rare (control frames, big frames, errors and their wording) is left to it.
 *
 * CRC-32C: the SSE4.2 crc32 instruction where the CPU has it (checked once at import with
 * __builtin_cpu_supports), else slicing-by-8 tables built at import. Raw semantics, as
 * Ceph's ceph_crc32c: the seed is the register's start value and the register is
 * returned without inversion.
 */
#include "_accel.h"

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
uint32_t accel_crc32c(uint32_t seed, const unsigned char *p, size_t n) {
    return have_sse42 ? crc_hw(seed, p, n) : crc_sw(seed, p, n);
}
#else
uint32_t accel_crc32c(uint32_t seed, const unsigned char *p, size_t n) {
    return crc_sw(seed, p, n);
}
#endif

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

static PyMethodDef methods[] = {
    {"crc32c", py_crc32c, METH_VARARGS,
     "crc32c(data, seed) -> int: raw CRC-32C (Ceph's ceph_crc32c) of data from seed."},
    {"scan_message", (PyCFunction)(void (*)(void))accel_scan_message, METH_FASTCALL,
     "scan_message(mv, start, end, segment_max, data_max) -> (new_start, segments) | None"},
    {"decode_messages", (PyCFunction)(void (*)(void))accel_decode_messages, METH_FASTCALL,
     "decode_messages(mv, start, end, segment_max, data_max, max_front, asyncmsgr, limit)"
     " -> (messages, ends, max_ack)"},
    {"setup_decode", (PyCFunction)(void (*)(void))accel_setup_decode, METH_FASTCALL,
     "setup_decode(message_class, unpackb, errors): what decode_messages builds and calls."},
    {"new_buffer", accel_new_buffer, METH_O,
     "new_buffer(size) -> bytearray: receive memory, not zeroed (the decoder reads only "
     "what the socket wrote)."},
    {"setup_encode", (PyCFunction)(void (*)(void))accel_setup_encode, METH_FASTCALL,
     "setup_encode(packb, check_outgoing_python): what check_outgoing encodes fronts with, "
     "and what it leaves the rest (and every error) to."},
    {"check_outgoing", (PyCFunction)(void (*)(void))accel_check_outgoing,
     METH_FASTCALL | METH_KEYWORDS,
     "check_outgoing(msg, ceph_peer=False) -> None: protocol.message.check_outgoing, "
     "compiled (raises LocalProtocolError for a message that cannot be sent)."},
    {"encode_batch", (PyCFunction)(void (*)(void))accel_encode_batch, METH_FASTCALL,
     "encode_batch(messages, start, asyncmsgr, out) -> int: the MESSAGE frames of "
     "messages[start:] appended to out, small ones joined; returns where it stopped."},
    {"encode_message_frame", (PyCFunction)(void (*)(void))accel_encode_message_frame, METH_FASTCALL,
     "encode_message_frame(header, front, data) -> list: one MESSAGE frame, no middle."},
    {"encode_message", (PyCFunction)(void (*)(void))accel_encode_message, METH_FASTCALL,
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
    if (accel_receive_init() < 0 || accel_send_init() < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddStringConstant(m, "CRC_IMPL", have_sse42 ? "sse4.2" : "table") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
