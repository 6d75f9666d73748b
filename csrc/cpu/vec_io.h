// Loads and stores of one SIMD vector of the accumulation type from any storage dtype, and
// reductions of a vector's lanes.
#pragma once
#include "capability.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace vae_ext::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Loads/stores one vector of the accumulation type (float for float/half types, double for
// double) from/to a tensor of scalar_t; the `n` overloads touch only the first n lanes.
template <typename scalar_t>
struct VecIO {
  using acc_t = scalar_t;
  using V = Vectorized<acc_t>;
  static V load(const scalar_t* p) { return V::loadu(p); }
  static V load(const scalar_t* p, int64_t n) { return V::loadu(p, n); }
  static void store(scalar_t* p, const V& v) { v.store(p); }
  static void store(scalar_t* p, const V& v, int64_t n) { v.store(p, n); }
};

template <typename half_t>
struct HalfVecIO {
  using acc_t = float;
  using V = Vectorized<float>;
  static V load(const half_t* p) {
    V out;
    at::vec::load_to_float<half_t>(p, out);
    return out;
  }
  static V load(const half_t* p, int64_t n) {
    float buf[V::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return V::loadu(buf);
  }
  static void store(half_t* p, const V& v) { at::vec::convert_from_float<half_t>(v, v).store(p, V::size()); }
  static void store(half_t* p, const V& v, int64_t n) { at::vec::convert_from_float<half_t>(v, v).store(p, n); }
};
template <>
struct VecIO<c10::BFloat16> : HalfVecIO<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : HalfVecIO<c10::Half> {};

// One vector of the first n <= V::size() elements: a full one through the plain load or store, a
// partial one through the `n` overload, which goes by way of a buffer.
template <typename scalar_t>
typename VecIO<scalar_t>::V load_n(const scalar_t* p, int64_t n) {
  using IO = VecIO<scalar_t>;
  return n == IO::V::size() ? IO::load(p) : IO::load(p, n);
}
template <typename scalar_t>
void store_n(scalar_t* p, const typename VecIO<scalar_t>::V& v, int64_t n) {
  using IO = VecIO<scalar_t>;
  if (n == IO::V::size())
    IO::store(p, v);
  else
    IO::store(p, v, n);
}

template <class V>
double hsum(const V& v) {  // horizontal sum in lane order, in double
  typename V::value_type buf[V::size()];
  v.store(buf);
  double s = 0.0;
  for (int64_t i = 0; i < V::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

template <class V>
bool any_lane_set(const V& mask) {
  unsigned char buf[sizeof(typename V::value_type) * V::size()];
  mask.store(buf);
  for (unsigned char c : buf)
    if (c) return true;
  return false;
}

}  // namespace vae_ext::cpu::CPU_CAPABILITY
