// Gather-scatter sparse x dense product on the CPU: out[r, :] = sum_k values[k] * x[columns[k], :] over the
// non-zeros k of row r (row_offsets). Columns of x are processed in tiles so that one tile of x stays in
// cache while every row of a thread's share accumulates into it; the inner loop is a contiguous
// multiply-add the compiler vectorises.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

torch::Tensor gs_matmul(torch::Tensor values, torch::Tensor columns, torch::Tensor row_offsets, torch::Tensor x,
                        int64_t tile) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(columns.scalar_type() == torch::kInt && row_offsets.scalar_type() == torch::kLong, "index types");
  x = x.contiguous();
  const int64_t rows = row_offsets.size(0) - 1, n = x.size(1);
  auto out = torch::zeros({rows, n}, x.options());
  const float* v = values.data_ptr<float>();
  const int32_t* c = columns.data_ptr<int32_t>();
  const int64_t* off = row_offsets.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t t = 0; t < n; t += tile) {
      const int64_t len = std::min(tile, n - t);
      for (int64_t r = r0; r < r1; ++r) {
        float* __restrict__ y = op + r * n + t;
        for (int64_t k = off[r]; k < off[r + 1]; ++k) {
          const float w = v[k];
          const float* __restrict__ xr = xp + static_cast<int64_t>(c[k]) * n + t;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) y[j] += w * xr[j];
        }
      }
    }
  });
  return out;
}

// Direct (implicit-im2col) gather-scatter convolution: out[b, r, oh, ow] += w_k * xpad[b, c, oh*sh + ih*dh,
// ow*sw + iw*dw] for every non-zero k = (c, ih, iw) of output channel r (columns in F.unfold order
// c*kh*kw + ih*kw + iw). xpad is the zero-padded input; each (b, r) output plane stays in cache while the
// row's non-zeros stream over it; with stride 1 the innermost loop is a contiguous multiply-add.
torch::Tensor gs_conv2d(torch::Tensor values, torch::Tensor columns, torch::Tensor row_offsets, torch::Tensor xpad,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t out_h,
                        int64_t out_w) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat && xpad.scalar_type() == torch::kFloat, "float32 only");
  xpad = xpad.contiguous();
  const int64_t batch = xpad.size(0), channels = xpad.size(1), hp = xpad.size(2), wp = xpad.size(3);
  const int64_t rows = row_offsets.size(0) - 1, area = kh * kw;
  auto out = torch::zeros({batch, rows, out_h, out_w}, xpad.options());
  const float* v = values.data_ptr<float>();
  const int32_t* c = columns.data_ptr<int32_t>();
  const int64_t* off = row_offsets.data_ptr<int64_t>();
  const float* xp = xpad.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool unit = sh == 1 && sw == 1;
  at::parallel_for(0, batch * rows, 1, [&](int64_t p0, int64_t p1) {
    // stride 1: accumulate over the padded width (one long contiguous run per non-zero), crop at the end
    std::vector<float> wide(unit ? out_h * wp : 0);
    const int64_t run = (out_h - 1) * wp + out_w;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / rows, r = p % rows;
      float* plane = op + (b * rows + r) * out_h * out_w;
      if (unit) std::fill(wide.begin(), wide.end(), 0.0f);
      for (int64_t k = off[r]; k < off[r + 1]; ++k) {
        const float w = v[k];
        const int64_t col = c[k], ch = col / area, ih = (col % area) / kw, iw = col % kw;
        const float* src = xp + ((b * channels + ch) * hp + ih * dh) * wp + iw * dw;
        if (unit) {
          float* __restrict__ y = wide.data();
          const float* __restrict__ xr = src;
#pragma omp simd
          for (int64_t j = 0; j < run; ++j) y[j] += w * xr[j];
          continue;
        }
        for (int64_t oh = 0; oh < out_h; ++oh) {
          float* __restrict__ y = plane + oh * out_w;
          const float* __restrict__ xr = src + oh * sh * wp;
          for (int64_t ow = 0; ow < out_w; ++ow) y[ow] += w * xr[ow * sw];
        }
      }
      if (unit)
        for (int64_t oh = 0; oh < out_h; ++oh)
          std::copy(wide.begin() + oh * wp, wide.begin() + oh * wp + out_w, plane + oh * out_w);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { 
  m.def("gs_matmul", &gs_matmul, "gather-scatter sparse x dense");
  m.def("gs_conv2d", &gs_conv2d, "direct gather-scatter convolution");
}
