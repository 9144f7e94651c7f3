// Gather-scatter sparse x dense products on the CPU, register-blocked: a block of up to 8 vectors of one output
// row stays in registers while every non-zero of the row adds its weight times the gathered input segment, and is
// stored once (not one load and store of the accumulator per multiply-add). The vectors are GCC/Clang vector
// extensions, lowered to the host's widest ISA by -march=native (AVX-512: one register each; AVX2: two).
// A row's non-zeros are taken in blocks of input rows (channels for a conv) whose data fit in L1, the partial sums
// accumulated in the output; a row whose length is not a multiple of the vector width ends with a vector that
// overlaps the one before it within the same register block.
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

// y[0, len) (+)= sum_k w[k] * (base + offset[k] * scale)[0, len) for V <= len <= A*V, in A vectors held in
// registers over all k: vector a starts at a*V, the last at len - V (overlapping the one before when len is not a
// multiple; every vector is loaded before any is stored, so the overlap is right when accumulating too).
template <int A, bool Accumulate, typename Offset>
inline void block(const float* __restrict__ w, const Offset* __restrict__ offset, int64_t scale, int64_t count,
                  const float* base, float* y, int64_t len) {
  int64_t start[A];
  for (int a = 0; a < A; ++a) start[a] = a * V;
  start[A - 1] = len - V;
  vec acc[A];
  for (int a = 0; a < A; ++a) acc[a] = Accumulate ? load(y + start[a]) : vec{};
  for (int64_t k = 0; k < count; ++k) {
    const float* src = base + static_cast<int64_t>(offset[k]) * scale;
    const vec wk = vec{} + w[k];
    for (int a = 0; a < A; ++a) acc[a] += wk * load(src + start[a]);
  }
  for (int a = 0; a < A; ++a) store(y + start[a], acc[a]);
}

// y[0, len) (+)= sum_k w[k] * (base + offset[k] * scale)[0, len): one pass over the non-zeros per 8 vectors of y,
// the passes cut so that the last covers at least one vector (passes never overlap, so accumulating is exact);
// scalars when len < V.
template <bool Accumulate, typename Offset>
inline void row(const float* w, const Offset* offset, int64_t scale, int64_t count, const float* base, float* y,
                int64_t len) {
  if (len < V) {
    for (int64_t j = 0; j < len; ++j) {
      float sum = Accumulate ? y[j] : 0.0f;
      for (int64_t k = 0; k < count; ++k) sum += w[k] * base[static_cast<int64_t>(offset[k]) * scale + j];
      y[j] = sum;
    }
    return;
  }
  int64_t j = 0;
  while (len - j > 8 * V) {
    if (len - j - 8 * V < V) {
      block<7, Accumulate>(w, offset, scale, count, base + j, y + j, 7 * V);
      j += 7 * V;
    } else {
      block<8, Accumulate>(w, offset, scale, count, base + j, y + j, 8 * V);
      j += 8 * V;
    }
  }
  const int64_t rest = len - j;
  switch ((rest + V - 1) / V) {
    case 1: block<1, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
    case 2: block<2, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
    case 3: block<3, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
    case 4: block<4, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
    case 5: block<5, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
    case 6: block<6, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
    case 7: block<7, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
    default: block<8, Accumulate>(w, offset, scale, count, base + j, y + j, rest); break;
  }
}

template <typename Offset>
inline void row_part(bool accumulate, const float* w, const Offset* offset, int64_t scale, int64_t count,
                     const float* base, float* y, int64_t len) {
  if (accumulate) {
    if (count) row<true>(w, offset, scale, count, base, y, len);
  } else {
    row<false>(w, offset, scale, count, base, y, len);
  }
}

// Per row r and block b: the first non-zero of the row in that block or later, segments[r * (blocks + 1) + b],
// b = 0..blocks, where column j lies in block (j / unit_size) / per_block (looked up per column, not divided per
// non-zero). Requires the columns of every row in ascending order.
std::vector<int64_t> block_segments(const int32_t* columns, const int64_t* offsets, int64_t rows, int64_t cols,
                                    int64_t unit_size, int64_t per_block, int64_t blocks) {
  std::vector<int32_t> column_block(cols);
  for (int64_t j = 0; j < cols; ++j) column_block[j] = static_cast<int32_t>(j / unit_size / per_block);
  std::vector<int64_t> segments(rows * (blocks + 1));
  for (int64_t k = 0; k < offsets[rows]; ++k)
    TORCH_CHECK(columns[k] >= 0 && columns[k] < cols, "gather-scatter column ", columns[k], " out of range");
  for (int64_t r = 0; r < rows; ++r) {
    int64_t k = offsets[r];
    for (int64_t b = 0; b <= blocks; ++b) {
      while (k < offsets[r + 1] && column_block[columns[k]] < b) {
        TORCH_CHECK(k == offsets[r] || columns[k - 1] <= columns[k], "gather-scatter columns not sorted in row ", r);
        ++k;
      }
      segments[r * (blocks + 1) + b] = k;
    }
  }
  return segments;
}

constexpr int64_t L1_BYTES = 24576;  // the input a block of non-zeros reads stays within (half a 48 KB L1)
constexpr int64_t MIN_BLOCK_NONZEROS = 16;  // per row and block on average: fewer, and the partial sums' loads and
                                            // stores cost more than the cache misses they avoid

// Input units (columns, or channels of `unit_size` columns) per block: as many as fit in L1 (`fit`), but enough
// for MIN_BLOCK_NONZEROS non-zeros per row at the layer's density.
inline int64_t block_units(int64_t fit, int64_t nnz, int64_t entries, int64_t unit_size) {
  const double per_unit = static_cast<double>(nnz) / std::max<int64_t>(entries, 1) * unit_size;  // per row
  const int64_t needed = static_cast<int64_t>(MIN_BLOCK_NONZEROS / std::max(per_unit, 1e-9)) + 1;
  return std::max<int64_t>({1, fit, std::min<int64_t>(needed, int64_t{1} << 30)});
}

}  // namespace

// Tiles of `tile` positions over [0, n), the last one extended to n when fewer than V positions would remain
// (so no tile is narrower than a vector unless n is, and tiles never overlap).
inline int64_t tile_count(int64_t n, int64_t tile) {
  return n < V ? 1 : std::max<int64_t>(1, n / tile + (n % tile >= V ? 1 : 0));
}

// out[t, r] = bias[r] + sum_k values[k] * x[t, columns[k]] over the non-zeros k of row r (row_offsets; columns
// ascending within a row): a linear layer on x of shape (n, cols). The tokens are processed in tiles: each thread
// copies the tile x[t:t+tile, :] transposed into a contiguous buffer (one row per input feature, so a non-zero
// reads a contiguous segment) and computes its rows on it, 16 rows at a time into a small buffer stored transposed
// into out; the non-zeros of those rows are taken block by block of input features so that the part of the buffer
// one block reads stays in L1 while the 16 rows use it. tile <= 0: chosen so that the buffer takes about 256 KB
// (between 1 and 8 vectors wide). An empty bias adds nothing.
torch::Tensor gs_linear(torch::Tensor values, torch::Tensor columns, torch::Tensor row_offsets, torch::Tensor x,
                        torch::Tensor bias, int64_t tile) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(columns.scalar_type() == torch::kInt && row_offsets.scalar_type() == torch::kLong, "index types");
  TORCH_CHECK(x.dim() == 2, "x must be (tokens, features)");
  x = x.contiguous();
  const int64_t rows = row_offsets.size(0) - 1, n = x.size(0), cols = x.size(1);
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == rows, "bias size");
  bias = bias.to(torch::kFloat).contiguous();
  auto out = torch::empty({n, rows}, x.options());
  const float* v = values.data_ptr<float>();
  const int32_t* c = columns.data_ptr<int32_t>();
  const int64_t* off = row_offsets.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  if (tile <= 0) tile = std::clamp<int64_t>((65536 / std::max<int64_t>(cols, 1)) / V * V, V, 8 * V);
  tile = std::min(n, std::max(tile, V));
  const int64_t tiles = tile_count(n, tile), width = tile + V;  // no tile is longer than width
  const int64_t per_block = block_units(L1_BYTES / (4 * width), off[rows], rows * cols, 1);
  const int64_t blocks = std::max<int64_t>(1, (cols + per_block - 1) / per_block);
  const std::vector<int64_t> segments = block_segments(c, off, rows, cols, 1, per_block, blocks);
  const int64_t* seg = segments.data();
  constexpr int64_t chunk = 16;
  at::parallel_for(0, (rows + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> packed(cols * width), partial(chunk * width);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t start = t * tile, len = t == tiles - 1 ? n - start : tile;
      for (int64_t i = 0; i < len; ++i) {
        const float* xr = xp + (start + i) * cols;
        for (int64_t col = 0; col < cols; ++col) packed[col * len + i] = xr[col];
      }
      for (int64_t rc = c0 * chunk; rc < std::min(rows, c1 * chunk); rc += chunk) {
        const int64_t count = std::min(chunk, rows - rc);
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t r = rc; r < rc + count; ++r) {
            const int64_t k0 = seg[r * (blocks + 1) + b], k1 = seg[r * (blocks + 1) + b + 1];
            row_part(b > 0, v + k0, c + k0, len, k1 - k0, packed.data(), &partial[(r - rc) * len], len);
          }
        for (int64_t i = 0; i < len; ++i) {
          float* o = op + (start + i) * rows + rc;
          for (int64_t j = 0; j < count; ++j) o[j] = partial[j * len + i] + (bp ? bp[rc + j] : 0.0f);
        }
      }
    }
  });
  return out;
}

// Direct (implicit-im2col) gather-scatter convolution: out[b, r, oh, ow] = sum_k w_k * xpad[b, c, oh*sh + ih*dh,
// ow*sw + iw*dw] over the non-zeros k = (c, ih, iw) of output channel r (columns in F.unfold order
// c*kh*kw + ih*kw + iw, ascending within a row); xpad is the zero-padded input. Each non-zero's input offset within
// an image is computed once per call. With stride 1 an output plane is one contiguous run over the padded width
// (cropped at the end): the runs are cut into tiles of 8 vectors, the work items are (image, tile, chunk of 16
// output channels), and within an item the non-zeros are taken block by block of input channels, so that the
// inputs one block of channels reads for the tile stay in L1 while the 16 output channels use them.
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
  std::vector<int64_t> column_source(channels * area);  // column j reads the image at column_source[j] (+ position)
  for (int64_t j = 0; j < channels * area; ++j) {
    const int64_t ch = j / area, ih = (j % area) / kw, iw = j % kw;
    column_source[j] = (ch * hp + ih * dh) * wp + iw * dw;
  }
  std::vector<int64_t> source(nnz);  // non-zero k reads the image at source[k]
  for (int64_t k = 0; k < nnz; ++k) {
    TORCH_CHECK(c[k] >= 0 && c[k] < channels * area, "gather-scatter column ", c[k], " out of range");
    source[k] = column_source[c[k]];
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
  const int64_t tiles = tile_count(run, tile), chunks = (rows + chunk - 1) / chunk;
  const int64_t reach = tile + V + (kh - 1) * dh * wp + (kw - 1) * dw;  // input floats per channel a tile reads
  const int64_t per_block = block_units(L1_BYTES / (4 * reach), nnz, rows * channels * area, area);
  const int64_t blocks = std::max<int64_t>(1, (channels + per_block - 1) / per_block);
  const std::vector<int64_t> segments = block_segments(c, off, rows, channels * area, area, per_block, blocks);
  const int64_t* seg = segments.data();
  at::parallel_for(0, batch * tiles * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (tiles * chunks), t = (i / chunks) % tiles, r0 = (i % chunks) * chunk;
      const int64_t start = t * tile, len = t == tiles - 1 ? run - start : tile;
      for (int64_t bl = 0; bl < blocks; ++bl)
        for (int64_t r = r0; r < std::min(rows, r0 + chunk); ++r) {
          const int64_t k0 = seg[r * (blocks + 1) + bl], k1 = seg[r * (blocks + 1) + bl + 1];
          row_part(bl > 0, v + k0, src + k0, 1, k1 - k0, xp + b * image_size + start,
                   yp + (b * rows + r) * run + start, len);
        }
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
  m.def("gs_linear", &gs_linear, "gather-scatter linear layer");
  m.def("gs_conv2d", &gs_conv2d, "direct gather-scatter convolution");
}
