# diamond - build, test, benchmark.
#   make            ./diamond (optimised; OpenMP and -march=native when the compiler has them)
#   make test       build and run every test; ends with "N passed, M failed" (TESTS="gemm conv":
#                   those alone)
#   make asan       the tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make msan       the tests under clang's MemorySanitizer (no value read before it is set;
#                   without OpenMP, whose runtime it cannot see into)
#   make test-arm64 the tests of an ARM64 (NEON) cross build run under qemu-aarch64 (Debian:
#                   apt install gcc-aarch64-linux-gnu qemu-user)
#   make test-arm64-bf16  the same built for ARMv8.6 with BF16 (gemm_stored_bf16 on BFDOT;
#                   qemu-aarch64's default CPU has it)
#   make debug      ./build/debug/diamond at -O0 -g
#   make fuzz       libFuzzer targets (clang) in build/fuzz/
#   make bench      the standard benchmarks
#   make golden     regenerate tests/golden/ and tests/fixtures/ with the PyTorch scripts in tools/
#                   (needs Debian's python3-torch)
#   make -j2 weights  train the embedded models in weights/ from scratch (see weights/README.md)
# Switches: NO_OMP=1 (no OpenMP), PORTABLE=1 (no -march=native), CC=clang.

CC ?= cc
OPT ?= -O3
BUILD ?= build
# -fno-trapping-math lets gcc vectorise the conditional selects in the activation loops
# (clang does by default), -fno-math-errno its sqrtf calls (AdamW's update; nothing reads errno
# after a math function); no result changes.
CFLAGS_BASE = -std=c11 -Wall -Wextra -fno-trapping-math -fno-math-errno -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L $(EXTRA_CFLAGS)
LDLIBS = -lm

# Feature detection: try each flag on an empty program and keep it only if it compiles.
try-flag = $(shell printf 'int main(void){return 0;}' | $(CC) $(1) -x c - -o /dev/null 2>/dev/null && echo yes)

ifeq ($(PORTABLE),1)
  ARCH_FLAGS =
  ARCH_MSG = portable (PORTABLE=1)
else ifeq ($(call try-flag,-march=native),yes)
  ARCH_FLAGS = -march=native
  ARCH_MSG = -march=native
else
  ARCH_FLAGS =
  ARCH_MSG = portable (-march=native not supported)
endif

# Without OpenMP the `#pragma omp` lines are simply ignored, which is what we want.
ifeq ($(NO_OMP),1)
  OMP_CFLAGS = -Wno-unknown-pragmas
  OMP_MSG = off (NO_OMP=1)
else ifeq ($(call try-flag,-fopenmp),yes)
  OMP_CFLAGS = -fopenmp
  OMP_LDFLAGS = -fopenmp
  OMP_MSG = on
else ifneq ($(wildcard /opt/homebrew/opt/libomp/include/omp.h),)
  OMP_CFLAGS = -Xpreprocessor -fopenmp -I/opt/homebrew/opt/libomp/include
  OMP_LDFLAGS = -L/opt/homebrew/opt/libomp/lib -lomp
  OMP_MSG = on (Homebrew libomp)
else
  OMP_CFLAGS = -Wno-unknown-pragmas
  OMP_MSG = off (compiler has no OpenMP)
endif

CFLAGS = $(CFLAGS_BASE) $(OPT) $(SANITIZE) $(ARCH_FLAGS) $(OMP_CFLAGS)
LDFLAGS += $(OMP_LDFLAGS) $(SANITIZE)

LIB_SRC = io.c tensor.c autograd.c nn.c train/world.c train/train.c train/save.c train/vae_encoder.c
LIB_OBJ = $(LIB_SRC:%.c=$(BUILD)/%.o)
HEADERS = $(wildcard *.h train/*.h)
TEST_SRC = $(wildcard tests/test_*.c)
# TESTS="gemm conv" runs tests/test_gemm.c and tests/test_conv.c alone; every test by default.
TESTS ?= $(TEST_SRC:tests/test_%.c=%)
TEST_BIN = $(TESTS:%=$(BUILD)/tests/test_%)

.PHONY: all diamond test test-arm64 test-arm64-bf16 asan msan debug fuzz bench golden clean info-flags weights weights-vae \
        weights-detector weights-flow weights-vae-decoder weights-flow-cfg
all: info-flags diamond

info-flags:
	@echo "diamond build: CC=$(CC) arch=$(ARCH_MSG) openmp=$(OMP_MSG)"

# Phony, so ./diamond is always the build just made, also after a build with another BUILD dir;
# replaced by a rename, so a ./diamond still running keeps its own file.
diamond: $(BUILD)/diamond
	cp $< $@.tmp && mv -f $@.tmp $@

$(BUILD)/%.o: %.c $(HEADERS) | $(BUILD)/tests
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libdiamond.a: $(LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/diamond: $(BUILD)/diamond.o $(BUILD)/train/commands.o $(BUILD)/libdiamond.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c tests/harness.h $(HEADERS) $(BUILD)/libdiamond.a
	$(CC) $(CFLAGS) $< $(BUILD)/libdiamond.a -o $@ $(LDFLAGS) $(LDLIBS)

$(BUILD)/tests:
	mkdir -p $@

# Each test binary prints "<name>: N passed, M failed"; the last line adds them up.
# A binary that dies without its summary line counts as one failure.
# A test that exits non-zero without reporting a failure of its own (a crash, or a leak the
# sanitizer found after the test's summary) counts as one failure.
# TEST_RUNNER (e.g. an emulator) runs each test binary and, through the tests, the diamond
# binary they call.
test: info-flags $(TEST_BIN) $(BUILD)/diamond
	@for t in $(TEST_BIN); do $(TEST_RUNNER) $$t > $(BUILD)/one-test.log; rc=$$?; \
	    cat $(BUILD)/one-test.log; \
	    if [ $$rc -ne 0 ] && ! grep -q ' [1-9][0-9]* failed$$' $(BUILD)/one-test.log; then \
	        echo "$$t (exit status $$rc: crashed, or the sanitizer failed it): 0 passed, 1 failed"; \
	    fi; \
	done | tee $(BUILD)/test.log; \
	awk '/: [0-9]+ passed, [0-9]+ failed$$/ {p += $$(NF-3); f += $$(NF-1)} \
	     END {printf "%d passed, %d failed\n", p, f; exit (f > 0 || p == 0)}' $(BUILD)/test.log

asan:
	$(MAKE) test BUILD=build/asan OPT="-O1 -g -fno-omit-frame-pointer" \
	    SANITIZE="-fsanitize=address,undefined -fno-sanitize-recover=undefined"

msan:
	$(MAKE) test BUILD=build/msan CC=clang NO_OMP=1 OPT="-O1 -g -fno-omit-frame-pointer" \
	    SANITIZE="-fsanitize=memory -fsanitize-memory-track-origins"

ARM64_QEMU = qemu-aarch64 -L /usr/aarch64-linux-gnu
test-arm64:
	TEST_RUNNER="$(ARM64_QEMU)" $(MAKE) test BUILD=build/arm64 CC=aarch64-linux-gnu-gcc
test-arm64-bf16:
	TEST_RUNNER="$(ARM64_QEMU)" $(MAKE) test BUILD=build/arm64-bf16 CC=aarch64-linux-gnu-gcc \
	    EXTRA_CFLAGS=-march=armv8.6-a+bf16

debug:
	$(MAKE) $(BUILD)/debug/diamond BUILD=build/debug OPT="-O0 -g"

FUZZ_SRC = $(wildcard tests/fuzz_*.c)
fuzz: $(FUZZ_SRC:tests/%.c=build/fuzz/%)
build/fuzz/%: tests/%.c io.c io.h io_unicode.h
	mkdir -p build/fuzz
	clang -std=c11 -g -O1 -D_DEFAULT_SOURCE -fsanitize=fuzzer,address,undefined $< io.c -o $@ -lm

bench: diamond
	./diamond bench gemm 1024 1024 1024
	./diamond bench conv 1 128 256 256 128 3 1 1
	./diamond bench conv 1 128 256 256 128 3 1 1 --groups 128
	./diamond bench attention 1 24 1024 128

# The embedded models, trained from scratch by diamond itself into weights/ (see weights/README.md).
# Two jobs at a time, one thread each (more threads are slower at these sizes; results do not
# depend on the count): the VAE beside the detector; then the flow model (on the VAE's latents,
# saved as the moving average of its weights) beside a longer training of the VAE's decoder alone
# on noisy latents (the encoder, so the latent space, stays fixed); then a second flow stage that
# also learns the unconditional velocity (a tenth of the prompts dropped) for classifier-free
# guidance. OMP_WAIT_POLICY=passive: idle OpenMP threads must not spin.
TRAIN = OMP_WAIT_POLICY=passive ./diamond train
weights: weights-detector weights-flow-cfg
weights-vae: diamond
	mkdir -p weights/logs
	$(TRAIN) vae --config weights/vae --out weights/vae --threads 1 --log weights/logs/vae.csv \
	    --quiet
weights-detector: diamond
	mkdir -p weights/logs
	$(TRAIN) detector --config weights/detector --out weights/detector --threads 1 \
	    --log weights/logs/detector.csv --quiet
weights-flow: weights-vae
	$(TRAIN) text+flow --config weights --vae weights/vae --out weights --steps 24000 --ema 0.999 \
	    --threads 1 --log weights/logs/flow.csv --quiet
weights-vae-decoder: weights-vae
	$(TRAIN) vae-decoder --config weights/vae --vae weights/vae --out weights/vae --steps 5000 \
	    --latent-noise 0.2 --threads 1 --log weights/logs/vae-decoder.csv --quiet
weights-flow-cfg: weights-flow weights-vae-decoder
	$(TRAIN) text+flow --config weights --init weights --vae weights/vae --out weights \
	    --steps 8000 --lr 5e-4 --warmup 200 --ema 0.999 --uncond 0.1 --seed 1 --threads 1 \
	    --log weights/logs/flow-cfg.csv --quiet

PYTHON ?= /usr/bin/python3
golden:
	for s in tools/golden_*.py tools/ref_flux2.py tools/ref_vae.py tools/ref_segformer.py tools/ref_qwen3.py; do \
	    $(PYTHON) $$s || exit 1; done
	$(PYTHON) tools/ref_sampler.py # last: it runs the fixtures the others write

clean:
	rm -rf build diamond diamond.tmp
