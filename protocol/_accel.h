/* protocol._accel: what the compiled per-message path's three files share.
 *
 * _accel.c: CRC-32C and the module; _accel_receive.c: the MESSAGE frame scan and the
 * receive batch; _accel_send.c: the MESSAGE frame builders and the send batch.
 */
#ifndef ASYNCMSGR_ACCEL_H
#define ASYNCMSGR_ACCEL_H

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
#define HEADER2_SIZE 41 /* ceph_msg_header2, packed: "<QQHHHIHQBHH" */
#define ASYNCMSGR_TYPE_BASE 0x8000

/* Raw CRC-32C (Ceph's ceph_crc32c): SSE4.2 where the CPU has it, else tables. */
uint32_t accel_crc32c(uint32_t seed, const unsigned char *p, size_t n);
#define CRC(seed, p, n) accel_crc32c((seed), (p), (n))

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

static inline uint16_t rd16(const unsigned char *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint64_t rd64(const unsigned char *p) {
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

/* _accel_receive.c */
int accel_receive_init(void);
PyObject *accel_new_buffer(PyObject *self, PyObject *arg);
PyObject *accel_scan_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *accel_setup_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *accel_decode_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* _accel_send.c */
int accel_send_init(void);
PyObject *accel_encode_message_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *accel_encode_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *accel_encode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *accel_setup_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *accel_check_outgoing(PyObject *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames);

#endif
