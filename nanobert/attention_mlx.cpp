// The fused attention of attention_cpu.c as an MLX primitive, for the MLX twin's inference
// on x86 CPUs: MLX's own C++ extension API (a Primitive whose eval_cpu runs on its stream's
// thread), bound with nanobind. Built by nanobert/mlx_cpu.py on first use and cached, as the
// torch twin's ctypes binding of the same kernel is (torch_cpu.py).
//
// Why a primitive: a kernel called from Python on evaluated arrays (numpy views) makes each
// layer wait for the last, so the shards on MLX's streams stop running side by side; inside
// the graph it is one more op on its stream, and the T x T scores never reach memory
// (docs/cpu-speed.md, item 12).
//
// q, k, v (B, T, H), mask (B, T) additive over keys or absent -> (B, T, H). The gradient
// (vjp) is the spelled-out attention's, from MLX ops: eval-mode gradients (the parity suite)
// still work; the twin's training never comes here.

#include <omp.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

extern "C" int nanobert_attention(const float* q, const float* k, const float* v, int64_t ld, const float* mask,
                                  float* out, int B, int heads, int T, int D, float scale, int threads);

static float scale(int head_dim) {  // 1 / sqrt(d), rounded to fp32 as the torch twin's (H // heads) ** -0.5
  return static_cast<float>(std::pow(static_cast<double>(head_dim), -0.5));
}

class Attention : public mx::Primitive {
 public:
  Attention(mx::Stream stream, int heads, int threads) : mx::Primitive(stream), heads_(heads), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &q = inputs[0], &k = inputs[1], &v = inputs[2];
    mx::array& y = outputs[0];
    y.set_data(mx::allocator::malloc(y.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& x : inputs) encoder.set_input_array(x);
    encoder.set_output_array(y);
    int B = q.shape(0), T = q.shape(1), H = q.shape(2);
    const float* mask = inputs.size() > 3 ? inputs[3].data<float>() : nullptr;
    // Runs later, on the stream's thread; MLX keeps the inputs' buffers alive until then.
    encoder.dispatch([q = q.data<float>(), k = k.data<float>(), v = v.data<float>(), mask, y = y.data<float>(), B, T,
                      H, heads = heads_, threads = threads_] {
      // OpenMP's thread count is per thread: oneDNN's GEMMs inside would otherwise take
      // every core from each of MLX's stream threads at once.
      omp_set_num_threads(threads);
      if (nanobert_attention(q, k, v, H, mask, y, B, heads, T, H / heads, scale(H / heads), threads))
        throw std::runtime_error("nanobert attention: out of memory for its score buffers");
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("nanobert attention: CPU only");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    // softmax(q k^T * scale + mask) v over heads, and its gradient, spelled out in MLX ops.
    auto s = stream();
    int B = primals[0].shape(0), T = primals[0].shape(1), H = primals[0].shape(2), D = H / heads_;
    auto heads = [&](const mx::array& x) {  // (B, T, H) -> (B, heads, T, D)
      return mx::transpose(mx::reshape(x, {B, T, heads_, D}, s), {0, 2, 1, 3}, s);
    };
    auto back = [&](const mx::array& x) {  // (B, heads, T, D) -> (B, T, H)
      return mx::reshape(mx::transpose(x, {0, 2, 1, 3}, s), {B, T, H}, s);
    };
    mx::array c(scale(D)), q = heads(primals[0]), k = heads(primals[1]), v = heads(primals[2]);
    mx::array dy = heads(cotangents[0]), scores = mx::matmul(q, mx::swapaxes(k, -1, -2, s), s);
    scores = mx::multiply(scores, c, s);
    if (primals.size() > 3) scores = mx::add(scores, mx::reshape(primals[3], {B, 1, 1, T}, s), s);
    mx::array p = mx::softmax(scores, {-1}, /* precise */ true, s);
    mx::array dp = mx::matmul(dy, mx::swapaxes(v, -1, -2, s), s);
    mx::array ds = mx::multiply(p, mx::subtract(dp, mx::sum(mx::multiply(dp, p, s), -1, true, s), s), s);
    std::vector<mx::array> grads;
    for (int i : argnums) {
      if (i == 0) grads.push_back(back(mx::multiply(mx::matmul(ds, k, s), c, s)));
      if (i == 1) grads.push_back(back(mx::multiply(mx::matmul(mx::swapaxes(ds, -1, -2, s), q, s), c, s)));
      if (i == 2) grads.push_back(back(mx::matmul(mx::swapaxes(p, -1, -2, s), dy, s)));
      if (i == 3) grads.push_back(mx::sum(ds, {1, 2}, false, s));  // the mask's: summed over heads and queries
    }
    return grads;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

  const char* name() const override { return "NanobertAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return heads_ == o.heads_ && threads_ == o.threads_;
  }

 private:
  int heads_, threads_;
};

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, std::optional<mx::array> mask,
                    int heads, int threads) {
  auto s = mx::to_stream({});  // the default stream (mx.stream(...) in Python sets it)
  if (s.device != mx::Device::cpu) throw std::invalid_argument("nanobert attention: CPU streams only");
  if (q.ndim() != 3 || k.shape() != q.shape() || v.shape() != q.shape() || q.shape(2) % heads)
    throw std::invalid_argument("nanobert attention: q, k, v must be (B, T, H) alike, H a multiple of heads");
  if (mask && mask->shape() != mx::Shape{q.shape(0), q.shape(1)})
    throw std::invalid_argument("nanobert attention: mask must be (B, T)");
  std::vector<mx::array> inputs = {q, k, v};
  if (mask) inputs.push_back(*mask);
  for (auto& x : inputs) {
    if (x.dtype() != mx::float32) throw std::invalid_argument("nanobert attention: float32 only");
    x = mx::contiguous(x, false, s);  // the kernel reads rows of one stride (no copy if they are)
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<Attention>(s, heads, threads), std::move(inputs));
}

NB_MODULE(nanobert_attention_mlx, m) {
  m.def("attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("mask").none(),
        nb::arg("heads"), nb::arg("threads"),
        "softmax(q k^T / sqrt(d) + mask) v per head: q, k, v (B, T, H), mask (B, T) or None -> (B, T, H)");
}
