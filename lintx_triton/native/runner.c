/* The decode step's runner as a CPython extension: what lintx_triton/native/__init__.py's Python runner (_runner)
 * does per call (compare the tensors with what the api's checks passed, allocate o, read the addresses, call
 * step.c's lintx_step_f32, bump the state's version), without the interpreter between its attribute reads and
 * calls and without ctypes' argument conversion: a B = 1 step in bench/cpu_decode.py 11.7-12.4 -> 10.3-10.6 us
 * against a 4.0-4.4 us copy of its state; with meta.cpp's reads, best of 200 rounds, 7.6 -> 5.7 us against 3.4
 * (bench/NOTES.md, issue #17).
 *
 * Module lintx_runner:
 *   setup(tensor_type, float32, strided, bump, is_grad_enabled, traced, len_torch_function_stack,
 *         DisableTorchFunction)                                              once, from torch and native
 *   Runner(step_address, dims, inplace, state_type, team_address=0)          a planned step; dims = (B, H, HKV,
 *       D, DV, map); team_address: step.c's lintx_step_f32_team, which splits the kv heads between torch's
 *       threads (setup_linear's get_num_threads and GOMP_parallel), or 0: one thread; calling it as
 *       runner(q, k, v, state, normalize, scale, eps) gives o (in place) or
 *       (o, (S, z)) (functional), or None when the arguments are not what it was planned for, autograd has
 *       something to record or a tracer is active: the caller then takes its other paths.
 *   calls(), split_calls()                                                   the steps run so far, and (those
 *       split between threads, the last one's parts) (for tests); in a forked child nothing is split
 *   setup_linear(parameter_type, linear_address, team_address, is_autocast_enabled, is_compiling,
 *                get_num_threads, gomp_parallel_address, max_rows, split_min)  once, from native._ext
 *   linear(x, weight, bias)                                                  lintx_triton.native.linear's checks
 *       and its call of linear.c in C: y, or None when the arguments are not eligible (LinearAttention.step
 *       makes four such calls a step; a tiny call's checks: 6.3 us in Python, 2.5 here with meta.cpp's reads)
 *   linear_calls()                                                           linear()'s calls so far: (whole,
 *       split between threads), for tests
 *   props(t)                                                                 what props() reads of t, as a tuple
 *   FROM_IMPL                                                                1: built with meta.cpp
 * A tensor's properties come from props(): built with -DLINTX_TORCH_META and linked to meta.cpp, from its
 * c10::TensorImpl (its _cdata) through c10's inline accessors; without, through its Python attributes, as the
 * Python runner reads them (only the Python C API).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "meta.h"

typedef int (*step_fn)(const int64_t *a, const float *se, int normalize);
typedef int (*step_team_fn)(const int64_t *a, const float *se, int normalize, int64_t gomp_parallel, int64_t parts);

static long long n_calls, n_split, last_parts; /* steps run, those split between threads, the last split's parts */
static long long n_linear[2];               /* linear.c's calls: whole, split between threads */
static PyObject *g_tensor, *g_f32, *g_strided, *g_bump, *g_grad_enabled, *g_traced, *g_tf_len, *g_tf_off;
static PyObject *s_shape, *s_dtype, *s_is_cpu, *s_is_contiguous, *s_is_neg, *s_data_ptr, *s_requires_grad,
    *s_new_empty, *s_stride, *s_cpu, *s_cdata, *s_layout, *s_is_zerotensor, *s_untyped_storage, *s_nbytes,
    *s_storage_offset, *s_enter, *s_exit;

/* setup_linear's: linear.c's entry points, and what lintx_triton.native.linear reads besides the tensors */
typedef int (*linear_fn)(const int64_t *a);
typedef int (*linear_team_fn)(const int64_t *a, int64_t gomp_parallel, int64_t parts);
static linear_fn g_linear;
static linear_team_fn g_linear_team;
static PyObject *g_parameter, *g_autocast, *g_compiling, *g_num_threads;
static int64_t g_max_rows, g_split_min, g_gomp;

/* In a forked child the parent's OpenMP team is gone (GNU OpenMP's threads do not survive a fork; a parallel
 * region there waits for them for ever): the child's steps and projections run on its calling thread. */
static void forked_child(void) { g_gomp = 0; }

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    step_fn fn;
    step_team_fn team; /* NULL: never split between threads (a small state) */
    int64_t dims[6]; /* B, H, HKV, D, DV, map */
    int inplace;
    PyObject *state_type;
} Runner;

#ifdef LINTX_TORCH_META
/* t's properties (want: LINTX_META_* bits) from its TensorImpl: one attribute read (_cdata, the address) and
 * meta.cpp's accessors. 0, or -1 with an exception set. */
static int props(PyObject *t, int want, lintx_meta *m)
{
    memset(m, 0, sizeof *m);
    PyObject *a = PyObject_GetAttr(t, s_cdata);
    if (a == NULL)
        return -1;
    void *impl = PyLong_AsVoidPtr(a);
    Py_DECREF(a);
    if (impl == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "lintx_triton.native: a tensor without a TensorImpl");
        return -1;
    }
    if (lintx_tensor_meta(impl, want, m) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "lintx_triton.native: c10 raised reading a tensor's properties");
        return -1;
    }
    return 0;
}
#else
/* x (a new reference, or NULL after an error) is want: 1; is not: 0; NULL: -1. Releases x. */
static int is_and_release(PyObject *x, PyObject *want)
{
    if (x == NULL)
        return -1;
    int r = x == want;
    Py_DECREF(x);
    return r;
}

/* t.name(), a method without arguments */
static PyObject *call_method(PyObject *t, PyObject *name)
{
    PyObject *args[1] = {t};
    return PyObject_VectorcallMethod(name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* t.name() as an int64 (a method without arguments): 0, or -1 with an exception set */
static int int_method(PyObject *t, PyObject *name, int64_t *out)
{
    PyObject *x = call_method(t, name);
    if (x == NULL)
        return -1;
    *out = (int64_t)PyLong_AsLongLong(x);
    Py_DECREF(x);
    return PyErr_Occurred() ? -1 : 0;
}

/* a shape or stride() tuple into out (its first LINTX_META_DIMS) and the extent it spans with the other (in
 * elements past the first, for sizes and strides both read: sum of (size - 1) stride) */
static int tuple_into(PyObject *x, int64_t *out, Py_ssize_t n)
{
    if (!PyTuple_Check(x) || PyTuple_GET_SIZE(x) != n)
        return 0;
    for (Py_ssize_t i = 0; i < n && i < LINTX_META_DIMS; i++)
        out[i] = (int64_t)PyLong_AsLongLong(PyTuple_GET_ITEM(x, i));
    return PyErr_Occurred() ? -1 : 1;
}

/* the same from t's Python attributes, read in the order that stops at the first that makes it not plain: its
 * shape, dtype, layout, is_cpu, is_neg(), _is_zerotensor(), then stride(), its storage's size and offset (the
 * extent its shape and strides span must lie in it), data_ptr() (not NULL where it has elements),
 * is_contiguous(), requires_grad (want LINTX_META_GRAD) */
static int props(PyObject *t, int want, lintx_meta *m)
{
    memset(m, 0, sizeof *m);
    PyObject *shape = PyObject_GetAttr(t, s_shape);
    if (shape == NULL)
        return -1;
    int ok = PyTuple_Check(shape);
    m->ndim = ok ? PyTuple_GET_SIZE(shape) : -1;
    int r;
    if (!ok || (r = is_and_release(PyObject_GetAttr(t, s_dtype), g_f32)) != 1
        || (r = is_and_release(PyObject_GetAttr(t, s_layout), g_strided)) != 1
        || (r = is_and_release(PyObject_GetAttr(t, s_is_cpu), Py_True)) != 1
        || (r = is_and_release(call_method(t, s_is_neg), Py_False)) != 1
        || (r = is_and_release(call_method(t, s_is_zerotensor), Py_False)) != 1) {
        Py_DECREF(shape);
        return !ok ? 0 : r < 0 ? -1 : 0;
    }
    PyObject *stride = call_method(t, s_stride), *storage = NULL;
    int64_t offset = 0, nbytes = 0;
    if (stride == NULL || (r = tuple_into(shape, m->sizes, m->ndim)) < 0
        || (r = tuple_into(stride, m->strides, m->ndim)) < 0 || int_method(t, s_storage_offset, &offset) != 0
        || (storage = call_method(t, s_untyped_storage)) == NULL || int_method(storage, s_nbytes, &nbytes) != 0) {
        Py_DECREF(shape);
        Py_XDECREF(stride);
        Py_XDECREF(storage);
        return -1;
    }
    /* the last element's offset + 1 (0: no element), from the full tuples (both of ndim entries: r == 1) */
    int64_t end = offset + 1;
    for (Py_ssize_t i = 0; r == 1 && i < m->ndim; i++) {
        const int64_t size = (int64_t)PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
        end = size == 0 || end == 0 ? 0 : end + (size - 1) * (int64_t)PyLong_AsLongLong(PyTuple_GET_ITEM(stride, i));
    }
    Py_DECREF(shape);
    Py_DECREF(stride);
    Py_DECREF(storage);
    if (PyErr_Occurred())
        return -1;
    if (r == 0 || end * (int64_t)sizeof(float) > nbytes) /* its storage shrunk under it (resize_): not plain */
        return 0;
    if (int_method(t, s_data_ptr, &m->data) != 0)
        return -1;
    if (end > 0 && m->data == 0) /* elements but no memory (a functional tensor's wrapper): not plain */
        return 0;
    m->plain = 1;
    if ((r = is_and_release(call_method(t, s_is_contiguous), Py_True)) < 0)
        return -1;
    m->contiguous = r;
    if ((want & LINTX_META_GRAD) && (m->requires_grad = is_and_release(PyObject_GetAttr(t, s_requires_grad),
                                                                       Py_True)) < 0)
        return -1;
    if (!(want & LINTX_META_DATA))
        m->data = 0;
    return 0;
}
#endif

/* The window from a call's first read of its tensors to its C call, in which no Python code may run (it could
 * resize a tensor after its shape and address were read): gc off (an allocation could run a finalizer) and
 * torch function modes off (torch.set_default_device's, which native._traced lets through, would run its
 * Python __torch_function__ on every read and allocation). Closed before the GIL is let go for the call: another
 * thread's gc.disable() in the meantime stays. */
typedef struct {
    int gc;          /* PyGC_Disable's answer (1: gc was on), -1: closed */
    PyObject *guard; /* a torch._C.DisableTorchFunction entered, or NULL */
} window;

static int window_open(window *w)
{
    w->gc = PyGC_Disable();
    w->guard = NULL;
    PyObject *n = PyObject_CallNoArgs(g_tf_len);
    if (n == NULL)
        return -1;
    const long long modes = PyLong_AsLongLong(n);
    Py_DECREF(n);
    if (modes == -1 && PyErr_Occurred())
        return -1;
    if (modes > 0) {
        PyObject *entered = NULL;
        if ((w->guard = PyObject_CallNoArgs(g_tf_off)) == NULL
            || (entered = PyObject_CallMethodNoArgs(w->guard, s_enter)) == NULL) {
            Py_CLEAR(w->guard);
            return -1;
        }
        Py_DECREF(entered);
    }
    return 0;
}

/* idempotent; an exception pending stays pending */
static void window_close(window *w)
{
    if (w->guard != NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *x = PyObject_CallMethodObjArgs(w->guard, s_exit, Py_None, Py_None, Py_None, NULL);
        if (x == NULL)
            PyErr_Clear();
        Py_XDECREF(x);
        PyErr_Restore(type, value, tb);
        Py_CLEAR(w->guard);
    }
    if (w->gc == 1)
        PyGC_Enable();
    w->gc = -1;
}

/* 1: t is a plain torch.Tensor, float32, on the CPU, contiguous, not a negated view, within its storage, of shape
 * dims[0..n); 0: not; -1: an error. Its address in *data; with grad, its requires_grad in *requires_grad. */
static int plain_as(PyObject *t, const int64_t *dims, Py_ssize_t n, int grad, int *requires_grad, int64_t *data)
{
    if ((PyObject *)Py_TYPE(t) != g_tensor)
        return 0;
    lintx_meta m;
    if (props(t, LINTX_META_DATA | (grad ? LINTX_META_GRAD : 0), &m) != 0)
        return -1;
    if (!m.plain || !m.contiguous || m.ndim != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (m.sizes[i] != dims[i])
            return 0;
    *requires_grad = m.requires_grad;
    *data = m.data;
    return 1;
}

/* t.new_empty(*dims), of t's dtype and device: n sizes as arguments (not a tuple: 0.9-1.1 against 1.4-1.6 us) */
static PyObject *new_empty(PyObject *t, const int64_t *dims, int n)
{
    PyObject *a[1 + LINTX_META_DIMS] = {t}, *out = NULL;
    int made = 0;
    for (; made < n; made++)
        if ((a[1 + made] = PyLong_FromLongLong(dims[made])) == NULL)
            goto done;
    out = PyObject_VectorcallMethod(s_new_empty, a, (size_t)(1 + n) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
done:
    for (int i = 0; i < made; i++)
        Py_DECREF(a[1 + i]);
    return out;
}

/* torch.get_num_threads() (setup_linear's), or -1 with an exception set */
static int64_t num_threads(void)
{
    PyObject *nt = PyObject_CallNoArgs(g_num_threads);
    const int64_t threads = nt ? (int64_t)PyLong_AsLongLong(nt) : -1;
    Py_XDECREF(nt);
    return threads < 0 && !PyErr_Occurred() ? 0 : threads; /* a count below 1: one thread */
}

/* fn() is True: 1; anything else: 0; -1: an error */
static int truth_of(PyObject *fn, PyObject *arg)
{
    PyObject *x = arg == NULL ? PyObject_CallNoArgs(fn) : PyObject_CallOneArg(fn, arg);
    if (x == NULL)
        return -1;
    int r = PyObject_IsTrue(x);
    Py_DECREF(x);
    return r;
}

static PyObject *runner_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Runner *r = (Runner *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 7 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a runner takes (q, k, v, state, normalize, scale, eps)");
        return NULL;
    }
    PyObject *q = args[0], *k = args[1], *v = args[2], *state = args[3];
    if ((PyObject *)Py_TYPE(state) != r->state_type)
        Py_RETURN_NONE;
    PyObject *S0, *z0;
    if (PyTuple_CheckExact(state) && PyTuple_GET_SIZE(state) == 2) {
        S0 = PyTuple_GET_ITEM(state, 0);
        z0 = PyTuple_GET_ITEM(state, 1);
    } else if (PyList_CheckExact(state) && PyList_GET_SIZE(state) == 2) {
        S0 = PyList_GET_ITEM(state, 0);
        z0 = PyList_GET_ITEM(state, 1);
    } else {
        Py_RETURN_NONE;
    }
    PyObject *ts[8] = {q, k, v, S0, z0, NULL, NULL, NULL}; /* then o, and S, z for the functional step */
    for (int i = 0; i < 5; i++)
        if ((PyObject *)Py_TYPE(ts[i]) != g_tensor)
            Py_RETURN_NONE;
    const int64_t B = r->dims[0], H = r->dims[1], HKV = r->dims[2], D = r->dims[3], DV = r->dims[4];
    const int64_t q_shape[3] = {B, H, D}, k_shape[3] = {B, HKV, D}, v_shape[3] = {B, HKV, DV};
    const int64_t S_shape[4] = {B, HKV, D, DV}, o_shape[3] = {B, H, DV};
    const int64_t *shapes[8] = {q_shape, k_shape, v_shape, S_shape, k_shape, o_shape, S_shape, k_shape};
    const Py_ssize_t ndims[8] = {3, 3, 3, 4, 3, 3, 4, 3};
    const int n = r->inplace ? 6 : 8;
    /* a list's items may change while Python code runs: hold them */
    Py_INCREF(S0);
    Py_INCREF(z0);
    PyObject *result = NULL;
    window win = {-1, NULL};
    /* the scalars before the tensors: normalize's __bool__ is Python code, which could resize one */
    const double scale = PyFloat_AsDouble(args[5]);
    if (scale == -1.0 && PyErr_Occurred())
        goto done;
    const double eps = PyFloat_AsDouble(args[6]);
    if (eps == -1.0 && PyErr_Occurred())
        goto done;
    const int normalize = PyObject_IsTrue(args[4]);
    if (normalize < 0)
        goto done;
    /* a tracer or mode: under a TorchFunctionMode even the attribute reads are its to answer */
    const int traced = truth_of(g_traced, NULL);
    int ok = traced < 0 ? -1 : !traced;
    const int grad = ok > 0 ? truth_of(g_grad_enabled, NULL) : 0;
    if (grad < 0)
        ok = -1;
    /* the kv heads split between torch's threads (its OpenMP team: setup_linear's) when the plan's state is large */
    int64_t parts = 1;
    if (ok > 0 && r->team && g_gomp) { /* g_gomp set: setup_linear has run */
        const int64_t threads = num_threads();
        if (threads < 0)
            ok = -1;
        else
            parts = threads < B * HKV ? threads : B * HKV;
    }
    /* the inputs read and checked in the window, then the outputs allocated (shapes from the plan) and checked */
    if (ok > 0 && window_open(&win) != 0)
        ok = -1;
    int64_t a[14] = {B, H, HKV, D, DV, r->dims[5]};
    const int at[8] = {6, 7, 8, 9, 10, 13, 11, 12}; /* each tensor's address in a */
    for (int i = 0; ok > 0 && i < n; i++) { /* with grad on, no input may need one */
        if (i == 5 && ((ts[5] = new_empty(q, o_shape, 3)) == NULL
                       || (!r->inplace && ((ts[6] = new_empty(S0, S_shape, 4)) == NULL
                                           || (ts[7] = new_empty(z0, k_shape, 3)) == NULL)))) {
            ok = -1;
            break;
        }
        int rg = 0;
        ok = plain_as(ts[i], shapes[i], ndims[i], grad && i < 5, &rg, &a[at[i]]);
        if (ok > 0 && rg)
            ok = 0;
    }
    if (ok < 0)
        goto done;
    if (ok == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (r->inplace) {
        a[11] = a[9];
        a[12] = a[10];
    }
    const float se[2] = {(float)scale, (float)eps};
    int err;
    window_close(&win);
    Py_BEGIN_ALLOW_THREADS
    err = parts > 1 ? r->team(a, se, normalize, g_gomp, parts) : r->fn(a, se, normalize);
    Py_END_ALLOW_THREADS
    if (err) {
        PyErr_SetString(PyExc_MemoryError, "lintx_triton.native: the decode step's scratch could not be allocated");
        goto done;
    }
    n_calls++;
    if (parts > 1) {
        n_split++;
        last_parts = parts;
    }
    if (r->inplace) {
        PyObject *b = PyObject_CallOneArg(g_bump, state);
        if (b == NULL)
            goto done;
        Py_DECREF(b);
        result = Py_NewRef(ts[5]);
    } else {
        result = Py_BuildValue("(O(OO))", ts[5], ts[6], ts[7]);
    }
done:
    window_close(&win);
    for (int i = 5; i < 8; i++)
        Py_XDECREF(ts[i]);
    Py_DECREF(S0);
    Py_DECREF(z0);
    return result;
}

static PyObject *runner_new(PyTypeObject *type, PyObject *args, PyObject *Py_UNUSED(kw))
{
    unsigned long long address;
    PyObject *dims, *state_type;
    int inplace;
    if (g_tensor == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "lintx_runner.setup() first");
        return NULL;
    }
    unsigned long long team = 0;
    if (!PyArg_ParseTuple(args, "KO!pO!|K", &address, &PyTuple_Type, &dims, &inplace, &PyType_Type, &state_type,
                          &team))
        return NULL;
    if (PyTuple_GET_SIZE(dims) != 6 || address == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "Runner(step_address, (B, H, HKV, D, DV, map), inplace, state_type, team_address=0)");
        return NULL;
    }
    Runner *r = (Runner *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    for (int i = 0; i < 6; i++)
        r->dims[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(dims, i));
    if (PyErr_Occurred()) {
        Py_DECREF(r);
        return NULL;
    }
    r->vectorcall = runner_call;
    r->fn = (step_fn)(uintptr_t)address;
    r->team = (step_team_fn)(uintptr_t)team;
    r->inplace = inplace;
    r->state_type = Py_NewRef(state_type);
    return (PyObject *)r;
}

static void runner_dealloc(Runner *r)
{
    Py_XDECREF(r->state_type);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lintx_runner.Runner",
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Runner, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = runner_new,
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_doc = "A planned decode step: runner(q, k, v, state, normalize, scale, eps) -> o, (o, (S, z)) or None",
};


/* lintx_triton.native.linear's checks, in the order that lets a mode answer none of the reads: y = x w^T + b in
 * linear.c, or None */
static PyObject *linear(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "linear(x, weight, bias)");
        return NULL;
    }
    if (g_linear == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "lintx_runner.setup_linear() first");
        return NULL;
    }
    PyObject *x = args[0], *w = args[1], *b = args[2] == Py_None ? NULL : args[2];
    PyObject *tw = (PyObject *)Py_TYPE(w), *tb = b ? (PyObject *)Py_TYPE(b) : NULL;
    if ((PyObject *)Py_TYPE(x) != g_tensor || (tw != g_tensor && tw != g_parameter)
        || (b && tb != g_tensor && tb != g_parameter))
        Py_RETURN_NONE;
    int r;
    /* a tracer, mode, torch.compile or CPU autocast (F.linear would return its dtype): torch's F.linear */
    if ((r = truth_of(g_traced, NULL)) != 0 || (r = truth_of(g_compiling, NULL)) != 0
        || (r = truth_of(g_autocast, s_cpu)) != 0)
        return r < 0 ? NULL : Py_NewRef(Py_None);
    const int grad = truth_of(g_grad_enabled, NULL);
    if (grad < 0)
        return NULL;
    const int64_t threads = num_threads();
    if (threads < 0)
        return NULL;
    /* x, w, b read and checked in the window (runner_call's), then y allocated and checked */
    const int want = LINTX_META_DATA | (grad ? LINTX_META_GRAD : 0);
    PyObject *y = NULL, *result = NULL;
    lintx_meta mx, mw, mb, my;
    window win = {-1, NULL};
    if (window_open(&win) != 0 || props(x, want, &mx) != 0 || props(w, want, &mw) != 0
        || (b && props(b, want, &mb) != 0))
        goto done;
    const int64_t M = mx.sizes[0], K = mx.sizes[1], N = mw.sizes[0];
    /* with grad on, nothing may need one */
    if (!(mx.plain && mw.plain && mx.ndim == 2 && mw.ndim == 2 && 0 < M && M <= g_max_rows && K > 0 && N > 0
          && mw.sizes[1] == K && (mx.strides[1] == 1 || K == 1) && mw.contiguous && !mx.requires_grad
          && !mw.requires_grad)
        || (b && !(mb.plain && mb.ndim == 1 && mb.sizes[0] == N && mb.contiguous && !mb.requires_grad))) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    const int64_t y_shape[2] = {M, N};
    if ((y = new_empty(x, y_shape, 2)) == NULL || props(y, LINTX_META_DATA, &my) != 0)
        goto done;
    if (!(my.plain && my.contiguous && my.ndim == 2 && my.sizes[0] == M && my.sizes[1] == N)) {
        PyErr_SetString(PyExc_RuntimeError, "lintx_triton.native.linear: x.new_empty gave another tensor");
        goto done;
    }
    /* the columns split between torch's threads (its OpenMP team) from g_split_min multiply-adds, as
     * native.linear splits them */
    const int64_t parts = M * N * K < g_split_min || !g_gomp ? 1 : threads < (N + 3) / 4 ? threads : (N + 3) / 4;
    const int64_t a[9] = {M, N, K, mx.data, mx.strides[0], mw.data, b ? mb.data : 0, my.data, N}; /* L_M .. */
    window_close(&win);
    Py_BEGIN_ALLOW_THREADS
    if (parts > 1)
        g_linear_team(a, g_gomp, parts);
    else
        g_linear(a);
    Py_END_ALLOW_THREADS
    n_linear[parts > 1]++;
    result = Py_NewRef(y);
done:
    window_close(&win);
    Py_XDECREF(y);
    return result;
}

static PyObject *setup_linear(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *objs[4];
    unsigned long long fn, team, gomp;
    long long max_rows, split_min;
    if (!PyArg_ParseTuple(args, "OKKOOOKLL", &objs[0], &fn, &team, &objs[1], &objs[2], &objs[3], &gomp, &max_rows,
                          &split_min))
        return NULL;
    if (fn == 0 || team == 0 || g_tensor == NULL) {
        PyErr_SetString(PyExc_ValueError, "setup() first, then setup_linear(parameter_type, linear_address, "
                                          "team_address, is_autocast_enabled, is_compiling, get_num_threads, "
                                          "gomp_parallel_address, max_rows, split_min)");
        return NULL;
    }
    PyObject **slots[4] = {&g_parameter, &g_autocast, &g_compiling, &g_num_threads};
    for (int i = 0; i < 4; i++)
        Py_XSETREF(*slots[i], Py_NewRef(objs[i]));
    g_linear = (linear_fn)(uintptr_t)fn;
    g_linear_team = (linear_team_fn)(uintptr_t)team;
    g_max_rows = max_rows;
    g_split_min = split_min;
    g_gomp = (int64_t)gomp;
    Py_RETURN_NONE;
}

static PyObject *setup(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *objs[8];
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5], &objs[6],
                          &objs[7]))
        return NULL;
    PyObject **slots[8] = {&g_tensor, &g_f32, &g_strided, &g_bump, &g_grad_enabled, &g_traced, &g_tf_len, &g_tf_off};
    for (int i = 0; i < 8; i++)
        Py_XSETREF(*slots[i], Py_NewRef(objs[i]));
    Py_RETURN_NONE;
}

static PyObject *calls(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    return PyLong_FromLongLong(n_calls);
}

/* props(t) as a tuple, for the check native._ext makes before it uses a build, and for tests: (sizes, strides,
 * data, plain, contiguous, requires_grad), sizes and strides up to LINTX_META_DIMS long, empty when not plain */
static PyObject *py_props(PyObject *Py_UNUSED(self), PyObject *t)
{
    if (g_tensor == NULL || !PyObject_TypeCheck(t, (PyTypeObject *)g_tensor)) {
        PyErr_SetString(PyExc_TypeError, "props(t): t a torch.Tensor, after setup()");
        return NULL;
    }
    lintx_meta m;
    if (props(t, LINTX_META_DATA | LINTX_META_GRAD, &m) != 0)
        return NULL;
    const Py_ssize_t n = !m.plain ? 0 : m.ndim < LINTX_META_DIMS ? (Py_ssize_t)m.ndim : LINTX_META_DIMS;
    PyObject *sizes = PyTuple_New(n), *strides = PyTuple_New(n);
    for (Py_ssize_t i = 0; sizes != NULL && strides != NULL && i < n; i++) {
        PyObject *a = PyLong_FromLongLong(m.sizes[i]), *b = PyLong_FromLongLong(m.strides[i]);
        if (a == NULL || b == NULL) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_CLEAR(sizes);
            break;
        }
        PyTuple_SET_ITEM(sizes, i, a);
        PyTuple_SET_ITEM(strides, i, b);
    }
    if (sizes == NULL || strides == NULL) {
        Py_XDECREF(sizes);
        Py_XDECREF(strides);
        return NULL;
    }
    return Py_BuildValue("(NNLiii)", sizes, strides, (long long)m.data, (int)m.plain, (int)m.contiguous,
                         (int)m.requires_grad);
}

static PyObject *split_calls(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    return Py_BuildValue("(LL)", n_split, last_parts);
}

static PyObject *linear_calls(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    return Py_BuildValue("(LL)", n_linear[0], n_linear[1]);
}

static PyMethodDef methods[] = {
    {"calls", calls, METH_NOARGS, "calls(): the native steps the runners have run in this process"},
    {"split_calls", split_calls, METH_NOARGS,
     "split_calls(): (those of calls() split between threads, the number of parts of the last)"},
    {"props", py_props, METH_O,
     "props(t): (sizes, strides, data_ptr, plain, contiguous, requires_grad) as the runners read them"},
    {"linear_calls", linear_calls, METH_NOARGS,
     "linear_calls(): linear()'s calls of linear.c in this process, (whole, split between threads)"},
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL,
     "linear(x, weight, bias): lintx_triton.native.linear's checks and call in C -> y or None"},
    {"setup_linear", setup_linear, METH_VARARGS,
     "setup_linear(parameter_type, linear_address, team_address, is_autocast_enabled, is_compiling, "
     "get_num_threads, gomp_parallel_address, max_rows, split_min): what linear() calls"},
    {"setup", setup, METH_VARARGS,
     "setup(tensor_type, float32, strided, bump, is_grad_enabled, traced, len_torch_function_stack, "
     "DisableTorchFunction): what a runner calls"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lintx_runner", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_lintx_runner(void)
{
    if (PyType_Ready(&RunnerType) < 0)
        return NULL;
    const char *names[18] = {"shape",  "dtype",  "is_cpu", "is_contiguous",  "is_neg",         "data_ptr",
                             "requires_grad",  "new_empty", "stride", "cpu", "_cdata", "layout", "_is_zerotensor",
                             "untyped_storage", "nbytes", "storage_offset", "__enter__", "__exit__"};
    PyObject **slots[18] = {&s_shape,   &s_dtype,          &s_is_cpu,          &s_is_contiguous, &s_is_neg,
                            &s_data_ptr, &s_requires_grad, &s_new_empty,       &s_stride,        &s_cpu,
                            &s_cdata,    &s_layout,        &s_is_zerotensor,   &s_untyped_storage, &s_nbytes,
                            &s_storage_offset, &s_enter,   &s_exit};
    for (int i = 0; i < 18; i++)
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    if (pthread_atfork(NULL, NULL, forked_child) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "lintx_runner: pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#ifdef LINTX_TORCH_META
    const int from_impl = 1;
#else
    const int from_impl = 0;
#endif
    if (PyModule_AddIntConstant(m, "FROM_IMPL", from_impl) < 0
        || PyModule_AddObjectRef(m, "Runner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
