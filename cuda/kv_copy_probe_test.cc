// Runs on every --config=cuda build machine, GPU or not: the run-time switch
// and the host-side checks that need no device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "cc/datapath/paged_test_util.h"
#include "cuda/kv_copy.h"

namespace kvtier {
namespace {

TEST(CudaProbe, AgreesWithTheRuntimeAndIsStable) {
  int n = 0;
  const bool runtime = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  EXPECT_EQ(CudaRuntimeAvailable(), runtime);
  EXPECT_EQ(CudaRuntimeAvailable(), CudaRuntimeAvailable());
  if (std::getenv("KVTIER_REQUIRE_GPU") != nullptr) {
    EXPECT_TRUE(CudaRuntimeAvailable())
        << "KVTIER_REQUIRE_GPU is set; cudaGetDeviceCount: "
        << cudaGetErrorString(cudaGetDeviceCount(&n)) << " (CUDA 13 runtime: driver >= 580)";
  }
}

TEST(CudaProbe, CpuLayoutIsRefused) {
  testing::PagedSpec s;
  testing::PagedKv kv(s);
  auto lay = PagedKvLayout::Create(kv.Descs());
  ASSERT_TRUE(lay.ok());
  auto cl = CudaKvLayout::Create(*lay);
  ASSERT_FALSE(cl.ok());
  EXPECT_EQ(cl.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(cl.status().message().find("not on a CUDA device"), std::string_view::npos);
}

TEST(CudaProbe, NoDeviceMeansFailedPreconditionNotACrash) {
  if (CudaRuntimeAvailable()) GTEST_SKIP() << "a GPU is present; covered by kv_copy_cuda_test";
  testing::PagedSpec s;
  testing::PagedKv kv(s);
  // Host memory described as CUDA memory: never dereferenced, since Create
  // must stop at the missing device.
  auto lay = PagedKvLayout::Create(kv.Descs(nullptr, DeviceType::kCuda), KvLayoutKind::kFlashAttn);
  ASSERT_TRUE(lay.ok());
  auto cl = CudaKvLayout::Create(*lay);
  ASSERT_FALSE(cl.ok());
  EXPECT_EQ(cl.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(cl.status().message().find("no usable CUDA device"), std::string_view::npos);
}

}  // namespace
}  // namespace kvtier
