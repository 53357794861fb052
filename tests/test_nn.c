/* test_nn.c - the shared layer plumbing: loading parameters by name and shape. */
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
    CHECK(linear_load(&l, m, 2, 3, true, "proj", &e) == 0, "linear_load: %s", e.msg);
    if (!l.weight) return;
    Tape *t = tape_new();
    Tensor *x = TENSOR_NEW(1, 2);
    x->data[0] = 2.0f, x->data[1] = 1.0f;
    Var *y = linear_apply(t, &l, var_new(t, x, false));
    const float want[3] = {2.0f - 2.0f + 0.1f, 1.0f + 3.0f + 0.2f, -0.5f + 8.0f + 0.3f};
    CHECK(y != NULL, "linear_apply");
    if (y) check_close("linear from a bf16 checkpoint", y->value->data, want, 3, 1e-6f, 1e-6f);
    tape_free(t);
    tensor_free(x);
    linear_free(&l);
}

static void test_errors_name_the_tensor(const StModel *m) {
    Linear l;
    Error e = {{0}};
    CHECK(linear_load(&l, m, 3, 3, true, "proj", &e) != 0 && strstr(e.msg, "proj.weight") &&
              strstr(e.msg, "[3, 2]") && strstr(e.msg, "[3, 3]"),
          "a mis-shaped tensor is named with both shapes: %s", e.msg);
    CHECK(l.weight == NULL && l.bias == NULL, "nothing is left loaded after a failure");
    CHECK(linear_load(&l, m, 2, 3, true, "other", &e) != 0 && strstr(e.msg, "other.weight"),
          "a missing tensor is named: %s", e.msg);
    Conv2d c;
    CHECK(conv2d_load(&c, m, 3, 4, 1, 1, 0, 2, false, "proj", &e) != 0 && strstr(e.msg, "groups"),
          "channels that do not split into groups are refused: %s", e.msg);
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
