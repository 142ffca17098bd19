// Runtime queries the binding needs without including CUDA headers itself.
#include "common.cuh"

namespace g2f {

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

int device_count(int* count) {
  *count = 0;
  return static_cast<int>(cudaGetDeviceCount(count));
}

}  // namespace g2f
