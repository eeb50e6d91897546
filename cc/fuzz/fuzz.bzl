"""kvtier_fuzz_target: a libFuzzer target and its corpus regression test.

kvtier_fuzz_target(name = "x", srcs = [...], deps = [...], corpus = "corpus/x")
defines
  x_lib          the target's code (LLVMFuzzerTestOneInput), no main;
  x_fuzzer       libFuzzer binary; tagged manual, built only under
                 --config=fuzz (clang; tools/fuzz.sh);
  x_corpus_test  cc_test that replays every file of `corpus` through the same
                 code with the default compiler (cc/fuzz/replay_main.cc): the
                 seeds and every crash reproducer run in `bazel test //...`.
"""

def kvtier_fuzz_target(name, srcs, corpus, deps = [], test_tags = [], **kwargs):
    native.cc_library(
        name = name + "_lib",
        testonly = True,
        srcs = srcs,
        deps = deps + ["//cc/fuzz:fuzz_check"],
        alwayslink = True,
        **kwargs
    )
    native.cc_binary(
        name = name + "_fuzzer",
        testonly = True,
        linkopts = ["-fsanitize=fuzzer"],
        tags = ["manual", "fuzzer"],
        deps = [":" + name + "_lib"],
    )
    native.cc_test(
        name = name + "_corpus_test",
        size = "small",
        # Runs from the runfiles root, where the corpus keeps its workspace path.
        args = [native.package_name() + "/" + corpus],
        data = native.glob([corpus + "/**"]),
        tags = test_tags,
        deps = [
            ":" + name + "_lib",
            "//cc/fuzz:replay_main",
        ],
    )
