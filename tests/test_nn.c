/* test_nn.c - the shared layer plumbing: loading parameters by name and shape into a Params. */
#include <stdlib.h>
#include <unistd.h>

#include "../nn.h"
#include "harness.h"

/* A small model file: a [3, 2] bf16 weight and a [3] f32 bias under "proj". */
static const char *write_model(char *dir) {
    static char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    uint16_t w[6];
    const float wf[6] = {1.0f, -2.0f, 0.5f, 3.0f, -0.25f, 8.0f};
    for (int i = 0; i < 6; i++) w[i] = f32_to_bf16(wf[i]);
    const float b[3] = {0.1f, 0.2f, 0.3f};
    StWriteTensor ts[] = {
        {.name = "proj.weight", .dtype = DTYPE_BF16, .ndim = 2, .shape = {3, 2}, .data = w},
        {.name = "proj.bias", .dtype = DTYPE_F32, .ndim = 1, .shape = {3}, .data = b},
    };
    Error e = {{0}};
    CHECK(st_write(path, ts, 2, &e) == 0, "write the model file: %s", e.msg);
    return path;
}

static void test_linear_load_and_apply(const StModel *m) {
    Linear l;
    Error e = {{0}};
    Params *p = params_new(m);
    CHECK(p && linear_load(&l, p, 2, 3, true, "proj", &e) == 0, "linear_load: %s", e.msg);
    if (!p || !l.weight) {
        params_free(p);
        return;
    }
    CHECK(params_count(p) == 2 && !strcmp(params_name(p, 0), "proj.weight") &&
              !strcmp(params_name(p, 1), "proj.bias") && params_var(p, 1) == l.bias &&
              !params_is_buffer(p, 0),
          "the Params lists both tensors by name, in loading order");
    Tape *t = tape_new();
    Tensor *x = TENSOR_NEW(1, 2);
    x->data[0] = 2.0f, x->data[1] = 1.0f;
    Var *y = linear_apply(t, &l, var_new(t, x, false));
    const float want[3] = {2.0f - 2.0f + 0.1f, 1.0f + 3.0f + 0.2f, -0.5f + 8.0f + 0.3f};
    CHECK(y != NULL && !y->requires_grad, "linear_apply, no gradient by default");
    if (y) check_close("linear from a bf16 checkpoint", y->value->data, want, 3, 1e-6f, 1e-6f);
    tape_free(t);
    /* trainable: d sum(y) / dW = x per row, d / db = 1, accumulated across two tapes */
    params_set_trainable(p, true);
    for (int pass = 0; pass < 2; pass++) {
        t = tape_new();
        Var *s = ag_sum(t, linear_apply(t, &l, var_new(t, x, false)));
        CHECK(s && tape_backward(t, s, &e) == 0, "backward to the parameters: %s", e.msg);
        tape_free(t);
    }
    const float dw[6] = {4.0f, 2.0f, 4.0f, 2.0f, 4.0f, 2.0f}, db[3] = {2.0f, 2.0f, 2.0f};
    CHECK(l.weight->grad && l.bias->grad, "trainable parameters get gradients");
    if (l.weight->grad && l.bias->grad) {
        check_close("dW accumulated over two passes", l.weight->grad->data, dw, 6, 0.0f, 0.0f);
        check_close("db accumulated over two passes", l.bias->grad->data, db, 3, 0.0f, 0.0f);
    }
    tensor_free(x);
    params_free(p);
}

static void test_errors_name_the_tensor(const StModel *m) {
    Linear l;
    Error e = {{0}};
    Params *p = params_new(m);
    if (!p) return;
    CHECK(linear_load(&l, p, 3, 3, true, "proj", &e) != 0 && strstr(e.msg, "proj.weight") &&
              strstr(e.msg, "[3, 2]") && strstr(e.msg, "[3, 3]"),
          "a mis-shaped tensor is named with both shapes: %s", e.msg);
    CHECK(l.weight == NULL && l.bias == NULL && params_count(p) == 0,
          "nothing is loaded after a failure");
    CHECK(linear_load(&l, p, 2, 3, true, "other", &e) != 0 && strstr(e.msg, "other.weight"),
          "a missing tensor is named: %s", e.msg);
    Conv2d c;
    CHECK(conv2d_load(&c, p, 3, 4, 1, 1, 0, 2, false, "proj", &e) != 0 && strstr(e.msg, "groups"),
          "channels that do not split into groups are refused: %s", e.msg);
    CHECK(params_load_buffer(p, &e, SHAPE(3), "proj.bias") && params_count(p) == 1 &&
              params_is_buffer(p, 0),
          "a buffer is listed as one: %s", e.msg);
    params_set_trainable(p, true);
    CHECK(!params_var(p, 0)->requires_grad, "a buffer never requires grad");
    params_free(p);
}

int main(void) {
    char dir[] = "/tmp/diamond-test-nn-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    const char *path = write_model(dir);
    StModel *m = NULL;
    Error e = {{0}};
    CHECK(st_model_open(&m, path, &e) == 0, "open: %s", e.msg);
    if (m) {
        test_linear_load_and_apply(m);
        test_errors_name_the_tensor(m);
        st_model_close(m);
    }
    unlink(path);
    rmdir(dir);
    return harness_finish("test_nn");
}
