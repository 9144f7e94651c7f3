// Gather-scatter sparse x dense products on the CPU, register-blocked: a block of up to 8 vectors of one output
// row stays in registers while every non-zero of the row adds its weight times the gathered input segment, and is
// stored once (not one load and store of the accumulator per multiply-add). The vectors are GCC/Clang vector
// extensions, lowered to the host's widest ISA by -march=native (AVX-512: one register each; AVX2: two).
// A row whose length is not a multiple of the vector width ends with one block that overlaps the previous one:
// blocks are stored, not accumulated, so the overlap is written twice with the same sums.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t V = 16;  // floats per vector (64 bytes)
typedef float vec __attribute__((vector_size(V * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// y[0, len) = sum_k w[k] * (base + offset[k] * scale)[0, len) for V <= len <= A*V, in A vectors held in registers
// over all k: vector a starts at a*V, the last at len - V (overlapping the one before when len is not a multiple).
template <int A, typename Offset>
inline void block(const float* __restrict__ w, const Offset* __restrict__ offset, int64_t scale, int64_t count,
                  const float* base, float* y, int64_t len) {
  int64_t start[A];
  for (int a = 0; a < A; ++a) start[a] = a * V;
  start[A - 1] = len - V;
  vec acc[A];
  for (int a = 0; a < A; ++a) acc[a] = vec{};
  for (int64_t k = 0; k < count; ++k) {
    const float* src = base + static_cast<int64_t>(offset[k]) * scale;
    const vec wk = vec{} + w[k];
    for (int a = 0; a < A; ++a) acc[a] += wk * load(src + start[a]);
  }
  for (int a = 0; a < A; ++a) store(y + start[a], acc[a]);
}

// y[0, len) = sum_k w[k] * (base + offset[k] * scale)[0, len): one pass over the non-zeros per 8 vectors of y
// (the last pass covering the remainder with as many vectors as it needs), scalars when len < V.
template <typename Offset>
inline void row(const float* w, const Offset* offset, int64_t scale, int64_t count, const float* base, float* y,
                int64_t len) {
  if (len < V) {
    for (int64_t j = 0; j < len; ++j) {
      float sum = 0.0f;
      for (int64_t k = 0; k < count; ++k) sum += w[k] * base[static_cast<int64_t>(offset[k]) * scale + j];
      y[j] = sum;
    }
    return;
  }
  int64_t j = 0;
  for (; len - j > 8 * V; j += 8 * V) block<8>(w, offset, scale, count, base + j, y + j, 8 * V);
  const int64_t rest = len - j;
  if (rest < V) {  // one vector ending at len, overlapping the previous pass
    block<1>(w, offset, scale, count, base + len - V, y + len - V, V);
    return;
  }
  switch ((rest + V - 1) / V) {
    case 1: block<1>(w, offset, scale, count, base + j, y + j, rest); break;
    case 2: block<2>(w, offset, scale, count, base + j, y + j, rest); break;
    case 3: block<3>(w, offset, scale, count, base + j, y + j, rest); break;
    case 4: block<4>(w, offset, scale, count, base + j, y + j, rest); break;
    case 5: block<5>(w, offset, scale, count, base + j, y + j, rest); break;
    case 6: block<6>(w, offset, scale, count, base + j, y + j, rest); break;
    case 7: block<7>(w, offset, scale, count, base + j, y + j, rest); break;
    default: block<8>(w, offset, scale, count, base + j, y + j, rest); break;
  }
}

}  // namespace

// out[r, :] = sum_k values[k] * x[columns[k], :] over the non-zeros k of row r (row_offsets). The columns of x are
// processed in tiles: each thread copies the tile x[:, t:t+tile] into a contiguous buffer (so the gathered rows lie
// close together: few pages, few cache sets) and computes its share of the rows on it. tile <= 0: chosen so that
// the buffer takes about 256 KB (between 1 and 8 vectors wide).
torch::Tensor gs_matmul(torch::Tensor values, torch::Tensor columns, torch::Tensor row_offsets, torch::Tensor x,
                        int64_t tile) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(columns.scalar_type() == torch::kInt && row_offsets.scalar_type() == torch::kLong, "index types");
  x = x.contiguous();
  const int64_t rows = row_offsets.size(0) - 1, cols = x.size(0), n = x.size(1);
  auto out = torch::empty({rows, n}, x.options());
  const float* v = values.data_ptr<float>();
  const int32_t* c = columns.data_ptr<int32_t>();
  const int64_t* off = row_offsets.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (tile <= 0) tile = std::clamp<int64_t>((65536 / std::max<int64_t>(cols, 1)) / V * V, V, 8 * V);
  tile = std::min(n, std::max(tile, V));  // a tile narrower than a vector only when the whole row is
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> packed(cols * tile);
    for (int64_t t = 0; t < n; t += tile) {
      const int64_t len = std::min(tile, n - t);
      for (int64_t col = 0; col < cols; ++col) std::copy(xp + col * n + t, xp + col * n + t + len, &packed[col * len]);
      for (int64_t r = r0; r < r1; ++r) {
        float* y = op + r * n + t;
        if (len >= V || n < V) {
          row(v + off[r], c + off[r], len, off[r + 1] - off[r], packed.data(), y, len);
        } else {  // a short last tile of a long row: one vector ending at n, read from x itself
          row(v + off[r], c + off[r], n, off[r + 1] - off[r], xp + n - V, op + r * n + n - V, V);
        }
      }
    }
  });
  return out;
}

// Direct (implicit-im2col) gather-scatter convolution: out[b, r, oh, ow] = sum_k w_k * xpad[b, c, oh*sh + ih*dh,
// ow*sw + iw*dw] over the non-zeros k = (c, ih, iw) of output channel r (columns in F.unfold order
// c*kh*kw + ih*kw + iw); xpad is the zero-padded input. Each non-zero's input offset within an image is computed
// once per call. With stride 1 an output plane is one contiguous run over the padded width (cropped at the end):
// the runs are cut into tiles of 8 vectors, and the work items are (image, tile, chunk of output channels), in
// that order, so the inputs one tile reads (every channel near that position) stay in cache while all output
// channels use them.
torch::Tensor gs_conv2d(torch::Tensor values, torch::Tensor columns, torch::Tensor row_offsets, torch::Tensor xpad,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t out_h,
                        int64_t out_w) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat && xpad.scalar_type() == torch::kFloat, "float32 only");
  xpad = xpad.contiguous();
  const int64_t batch = xpad.size(0), channels = xpad.size(1), hp = xpad.size(2), wp = xpad.size(3);
  const int64_t rows = row_offsets.size(0) - 1, area = kh * kw, nnz = values.size(0);
  auto out = torch::empty({batch, rows, out_h, out_w}, xpad.options());
  const float* v = values.data_ptr<float>();
  const int32_t* c = columns.data_ptr<int32_t>();
  const int64_t* off = row_offsets.data_ptr<int64_t>();
  const float* xp = xpad.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<int64_t> source(nnz);  // non-zero k reads the image at source[k] (+ the output position)
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t col = c[k], ch = col / area, ih = (col % area) / kw, iw = col % kw;
    source[k] = (ch * hp + ih * dh) * wp + iw * dw;
  }
  const int64_t* src = source.data();
  const int64_t image_size = channels * hp * wp;
  if (sh != 1 || sw != 1) {
    at::parallel_for(0, batch * rows, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / rows, r = p % rows;
        float* plane = op + p * out_h * out_w;
        std::fill(plane, plane + out_h * out_w, 0.0f);
        for (int64_t k = off[r]; k < off[r + 1]; ++k) {
          const float w = v[k];
          const float* s = xp + b * image_size + src[k];
          for (int64_t oh = 0; oh < out_h; ++oh) {
            float* __restrict__ y = plane + oh * out_w;
            const float* __restrict__ xr = s + oh * sh * wp;
            for (int64_t ow = 0; ow < out_w; ++ow) y[ow] += w * xr[ow * sw];
          }
        }
      }
    });
    return out;
  }
  const int64_t run = (out_h - 1) * wp + out_w;
  const bool direct = wp == out_w;  // no width padding (1x1 kernel): the run is the output plane itself
  torch::Tensor wide = direct ? out : torch::empty({batch, rows, run}, xpad.options());
  float* yp = wide.data_ptr<float>();
  constexpr int64_t tile = 8 * V, chunk = 16;
  const int64_t tiles = (run + tile - 1) / tile, chunks = (rows + chunk - 1) / chunk;
  at::parallel_for(0, batch * tiles * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (tiles * chunks), t = (i / chunks) % tiles, r0 = (i % chunks) * chunk;
      int64_t start = t * tile, len = std::min(tile, run - start);
      if (len < V && run >= V) start = run - V, len = V;  // a short last tile: one vector ending at the run's end
      for (int64_t r = r0; r < std::min(rows, r0 + chunk); ++r)
        row(v + off[r], src + off[r], 1, off[r + 1] - off[r], xp + b * image_size + start,
            yp + (b * rows + r) * run + start, len);
    }
  });
  if (!direct)
    at::parallel_for(0, batch * rows, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t oh = 0; oh < out_h; ++oh)
          std::copy(yp + p * run + oh * wp, yp + p * run + oh * wp + out_w, op + (p * out_h + oh) * out_w);
    });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gs_matmul", &gs_matmul, "gather-scatter sparse x dense");
  m.def("gs_conv2d", &gs_conv2d, "direct gather-scatter convolution");
}
