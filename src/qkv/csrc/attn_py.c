/* The one entry point of the CPU kernel library that Python calls directly, through the CPython API rather than
 * ctypes: the check of an attention output that runs on every call SDPA serves (src/qkv/engines/sdpa.py). There
 * the output is tiny and the check a few hundred nanoseconds, while a ctypes call (ten arguments converted by
 * argtypes) costs ~3.5 µs. Everything else is loaded with ctypes (cpu_kernel.py). This file is the only one that
 * includes Python.h; the C tests build the library without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "attn_common.h"

int qkv_rows_plausible(int dt, const void *x, int64_t B, int64_t H, int64_t N, int64_t D, int64_t sb, int64_t sh,
                       int64_t sn, int64_t sd);

/* Reads 4 int64 from a tuple (torch.Size is one): 0, or -1 with an exception set. */
static int four(PyObject *t, int64_t *out, const char *what) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
        PyErr_Format(PyExc_TypeError, "rows_plausible: %s must be a tuple of 4 ints", what);
        return -1;
    }
    for (int i = 0; i < 4; i++) {
        out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(t, i));
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* rows_plausible(dt, data_ptr, shape, strides) -> bool: qkv_rows_plausible on a (B, H, N, D) array. Large
 * arrays are read without the GIL (as the ctypes calls do). */
static PyObject *rows_plausible(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "rows_plausible(dt, data_ptr, shape, strides) takes 4 arguments");
        return NULL;
    }
    const long dt = PyLong_AsLong(args[0]);
    if (dt == -1 && PyErr_Occurred()) return NULL;
    if (dt < QKV_F32 || dt > QKV_F16) {
        PyErr_Format(PyExc_ValueError, "rows_plausible: unknown element type %ld", dt);
        return NULL;
    }
    void *x = PyLong_AsVoidPtr(args[1]);
    if (x == NULL && PyErr_Occurred()) return NULL;
    int64_t s[4], st[4];
    if (four(args[2], s, "shape") || four(args[3], st, "strides")) return NULL;
    int ok;
    if (s[0] * s[1] * s[2] * s[3] >= (1 << 16)) {
        Py_BEGIN_ALLOW_THREADS
        ok = qkv_rows_plausible((int)dt, x, s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3]);
        Py_END_ALLOW_THREADS
    } else {
        ok = qkv_rows_plausible((int)dt, x, s[0], s[1], s[2], s[3], st[0], st[1], st[2], st[3]);
    }
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"rows_plausible", (PyCFunction)(void (*)(void))rows_plausible, METH_FASTCALL,
     "rows_plausible(dt, data_ptr, shape, strides) -> bool: every row of a (B, H, N, D) array finite and not all "
     "zeros (dt: 0 fp32, 1 bf16, 2 fp16; strides in elements)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_attn_cpu",
    "qkv's CPU attention kernel; the kernel's entry points are loaded with ctypes (qkv.engines.cpu_kernel).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__attn_cpu(void) { return PyModule_Create(&module); }
