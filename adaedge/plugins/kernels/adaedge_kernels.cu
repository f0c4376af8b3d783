// adaedge's CUDA kernels: the cheap-operation fills of VA-RED² and TAdaConv's calibrated
// convolution. One file, included by the TensorRT plugins (src/plugins.cu) and compiled on its own
// by the tests (CuPy RawModule), so that what is tested is what the plugins run.
//
// Layouts are the bundle's: NCTHW for the fills, frames folded into the batch (N*T, C, H, W) for
// the calibrated convolution. float32, one thread per output element (grid-stride loops).
#ifndef ADAEDGE_KERNELS_CU
#define ADAEDGE_KERNELS_CU

#ifndef ADAEDGE_KERNEL
#define ADAEDGE_KERNEL extern "C" __global__
#endif

// One output pixel of a depthwise k x k convolution (stride 1, zero padding k / 2) of plane src.
__device__ __forceinline__ float adaedge_dw_pixel(const float* __restrict__ src,
                                                  const float* __restrict__ w, int H, int W,
                                                  int k, int h, int x)
{
    const int pad = k / 2;
    float acc = 0.f;
    for (int i = 0; i < k; ++i) {
        const int hh = h + i - pad;
        if (hh < 0 || hh >= H) continue;
        for (int j = 0; j < k; ++j) {
            const int xx = x + j - pad;
            if (xx < 0 || xx >= W) continue;
            acc += w[i * k + j] * src[hh * W + xx];
        }
    }
    return acc;
}

// Channel fill: out (N, Cc * (1 + mult), T, H, W). Channels [0, Cc) are the computed y
// (N, Cc, T, H, W) copied; channel Cc + f is the depthwise convolution of y's channel f / mult
// with w[f] (Cc * mult, k, k) plus b[f], through a ReLU when relu != 0. One pass writes both halves.
ADAEDGE_KERNEL void adaedge_channel_fill(const float* __restrict__ y, const float* __restrict__ w,
                                         const float* __restrict__ b, float* __restrict__ out,
                                         int N, int Cc, int mult, int T, int H, int W, int k,
                                         int relu)
{
    const int Cout = Cc * (1 + mult);
    const long long plane = (long long)H * W;
    const long long total = (long long)N * Cout * T * plane;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int x = (int)(i % W);
        const int h = (int)((i / W) % H);
        const int t = (int)((i / plane) % T);
        const int c = (int)((i / (plane * T)) % Cout);
        const int n = (int)(i / (plane * T * Cout));
        float v;
        if (c < Cc) {
            v = y[(((long long)n * Cc + c) * T + t) * plane + h * W + x];
        } else {
            const int f = c - Cc;
            const int s = f / mult;
            const float* src = y + (((long long)n * Cc + s) * T + t) * plane;
            v = adaedge_dw_pixel(src, w + (long long)f * k * k, H, W, k, h, x) + b[f];
            if (relu && v < 0.f) v = 0.f;
        }
        out[i] = v;
    }
}

// Temporal fill: out (N, C, Tout, H, W) from y (N, C, Tc, H, W) computed at temporal stride r.
// Frame tc * r is y's frame tc; frame tc * r + j (0 < j < r) is the depthwise convolution of y's
// frame tc with w[c * (r - 1) + j - 1] plus its bias: the skipped frames rebuilt from the computed
// ones, written interleaved in one pass. Frames past Tout are not written. ReLU (relu != 0) applies
// to every frame, as in the standard-op body (the computed frames are already non-negative then).
ADAEDGE_KERNEL void adaedge_temporal_fill(const float* __restrict__ y, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ out,
                                          int N, int C, int Tc, int r, int Tout, int H, int W,
                                          int k, int relu)
{
    const long long plane = (long long)H * W;
    const long long total = (long long)N * C * Tout * plane;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int x = (int)(i % W);
        const int h = (int)((i / W) % H);
        const int t = (int)((i / plane) % Tout);
        const int c = (int)((i / (plane * Tout)) % C);
        const int n = (int)(i / (plane * Tout * C));
        const int tc = t / r;
        const int j = t % r;
        const float* src = y + (((long long)n * C + c) * Tc + tc) * plane;
        float v;
        if (j == 0) {
            v = src[h * W + x];
        } else {
            const int f = c * (r - 1) + j - 1;
            v = adaedge_dw_pixel(src, w + (long long)f * k * k, H, W, k, h, x) + b[f];
        }
        if (relu && v < 0.f) v = 0.f;
        out[i] = v;
    }
}

// Calibrated convolution (TAdaConv): x (NT, Cin, H, W), weight (Cout, Cin / groups, kh, kw),
// alpha (NT, Ca) per frame and channel, bias (Cout); out (NT, Cout, Ho, Wo).
// cal_on_input != 0: Ca = Cin and y = conv(x * alpha) + bias (calibration in the input path);
// otherwise Ca = Cout and y = conv(x) * alpha + bias (in the output path). The calibration is
// applied inside the convolution's loop: no calibrated copy of x or of the weights is made.
ADAEDGE_KERNEL void adaedge_calibrated_conv(const float* __restrict__ x,
                                            const float* __restrict__ weight,
                                            const float* __restrict__ alpha,
                                            const float* __restrict__ bias, float* __restrict__ out,
                                            int NT, int Cin, int H, int W, int Cout, int groups,
                                            int kh, int kw, int sh, int sw, int ph, int pw,
                                            int dh, int dw, int Ho, int Wo, int cal_on_input)
{
    const int cin_g = Cin / groups;
    const int cout_g = Cout / groups;
    const long long total = (long long)NT * Cout * Ho * Wo;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int xo = (int)(i % Wo);
        const int yo = (int)((i / Wo) % Ho);
        const int co = (int)((i / ((long long)Wo * Ho)) % Cout);
        const int n = (int)(i / ((long long)Wo * Ho * Cout));
        const int g = co / cout_g;
        float acc = 0.f;
        for (int ci = 0; ci < cin_g; ++ci) {
            const int cin = g * cin_g + ci;
            const float* xp = x + ((long long)n * Cin + cin) * H * W;
            const float* wp = weight + ((long long)co * cin_g + ci) * kh * kw;
            float part = 0.f;
            for (int a = 0; a < kh; ++a) {
                const int hh = yo * sh - ph + a * dh;
                if (hh < 0 || hh >= H) continue;
                for (int bb = 0; bb < kw; ++bb) {
                    const int ww = xo * sw - pw + bb * dw;
                    if (ww < 0 || ww >= W) continue;
                    part += wp[a * kw + bb] * xp[hh * W + ww];
                }
            }
            acc += cal_on_input ? part * alpha[(long long)n * Cin + cin] : part;
        }
        if (!cal_on_input) acc *= alpha[(long long)n * Cout + co];
        out[i] = acc + bias[co];
    }
}

#endif  // ADAEDGE_KERNELS_CU
