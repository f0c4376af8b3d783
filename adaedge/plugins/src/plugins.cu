// adaedge's TensorRT plugins (IPluginV3, TensorRT 10 and newer): CheapFill and CalibratedConv.
//
// The exporter writes these ops as custom ONNX nodes (domain "adaedge") whose function bodies hold
// standard ops; adaedge's TensorRT backend keeps the nodes for the parser's plugin lookup when this
// library is loaded, and inlines the bodies otherwise. The kernels are adaedge_kernels.cu, the
// same file the tests compile. float32, linear layout; TensorRT reformats around them in fp16
// engines.
//
// Loadable by TensorRT's plugin registry (IPluginRegistry::loadLibrary, trtexec --staticPlugins or
// --dynamicPlugins): the library exports getCreators() and setLoggerFinder().

#include "NvInferRuntime.h"
#include "../kernels/adaedge_kernels.cu"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace adaedge
{
namespace
{
char const* const kNAMESPACE = "";
char const* const kVERSION = "1";

int launchBlocks(long long total)
{
    long long const blocks = (total + 255) / 256;
    return static_cast<int>(std::min<long long>(std::max<long long>(blocks, 1), 65535LL * 16));
}

// Reads plugin fields (ONNX attributes arrive as INT32 arrays, strings as CHAR).
struct Fields
{
    PluginFieldCollection const* fc;
    std::vector<int32_t> ints(char const* name, std::vector<int32_t> fallback) const
    {
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (std::strcmp(f.name, name) == 0 && f.type == PluginFieldType::kINT32)
            {
                auto const* data = static_cast<int32_t const*>(f.data);
                return std::vector<int32_t>(data, data + f.length);
            }
        }
        return fallback;
    }
    int32_t one(char const* name, int32_t fallback) const
    {
        auto v = ints(name, {fallback});
        return v.empty() ? fallback : v[0];
    }
    std::string text(char const* name, std::string fallback) const
    {
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (std::strcmp(f.name, name) == 0 && f.type == PluginFieldType::kCHAR)
            {
                auto const* data = static_cast<char const*>(f.data);
                return std::string(data, strnlen(data, static_cast<size_t>(f.length)));
            }
        }
        return fallback;
    }
};

// Shared boilerplate of the two plugins: the capability lookup and the core names.
template <typename Derived>
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) Derived(static_cast<Derived const&>(*this));
    }
    AsciiChar const* getPluginName() const noexcept override
    {
        return Derived::kNAME;
    }
    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kVERSION;
    }
    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kNAMESPACE;
    }
    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }
    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        outputTypes[0] = DataType::kFLOAT;
        return 0;
    }
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        return inOut[pos].desc.type == DataType::kFLOAT && inOut[pos].desc.format == TensorFormat::kLINEAR;
    }
    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        return 0;
    }
    int32_t onShapeChange(
        PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        return 0;
    }
    IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override
    {
        return clone();
    }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

protected:
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// ---------------------------------------------------------------------------------------------
// CheapFill(y, W, B; mode, relu, ratio, frames_out)

class CheapFillPlugin : public PluginBase<CheapFillPlugin>
{
public:
    static constexpr char const* kNAME = "CheapFill";

    explicit CheapFillPlugin(Fields const& f)
        : mTemporal(f.text("mode", "channel") == "temporal")
        , mRelu(f.one("relu", 0))
        , mRatio(f.one("ratio", 1))
        , mFramesOut(f.one("frames_out", 0))
    {
        setFields();
    }
    CheapFillPlugin(CheapFillPlugin const& other)
        : PluginBase<CheapFillPlugin>()
        , mTemporal(other.mTemporal)
        , mRelu(other.mRelu)
        , mRatio(other.mRatio)
        , mFramesOut(other.mFramesOut)
    {
        setFields();
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 3 || inputs[0].nbDims != 5)
        {
            return -1;
        }
        outputs[0] = inputs[0];
        if (mTemporal)
        {
            outputs[0].d[2] = exprBuilder.constant(mFramesOut);
        }
        else
        {
            // computed channels + fill channels (the fill weight's first dimension)
            outputs[0].d[1] = exprBuilder.operation(DimensionOperation::kSUM, *inputs[0].d[1], *inputs[1].d[0]);
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& y = inputDesc[0].dims;
        Dims const& w = inputDesc[1].dims;
        int const n = static_cast<int>(y.d[0]), c = static_cast<int>(y.d[1]), t = static_cast<int>(y.d[2]);
        int const h = static_cast<int>(y.d[3]), wd = static_cast<int>(y.d[4]);
        int const k = static_cast<int>(w.d[w.nbDims - 1]);
        auto const* yp = static_cast<float const*>(inputs[0]);
        auto const* wp = static_cast<float const*>(inputs[1]);
        auto const* bp = static_cast<float const*>(inputs[2]);
        auto* out = static_cast<float*>(outputs[0]);
        if (mTemporal)
        {
            long long const total = 1LL * n * c * mFramesOut * h * wd;
            adaedge_temporal_fill<<<launchBlocks(total), 256, 0, stream>>>(
                yp, wp, bp, out, n, c, t, mRatio, mFramesOut, h, wd, k, mRelu);
        }
        else
        {
            int const mult = static_cast<int>(w.d[0]) / c;
            long long const total = 1LL * n * c * (1 + mult) * t * h * wd;
            adaedge_channel_fill<<<launchBlocks(total), 256, 0, stream>>>(yp, wp, bp, out, n, c, mult, t, h, wd, k, mRelu);
        }
        return cudaPeekAtLastError() == cudaSuccess ? 0 : -1;
    }

private:
    void setFields()
    {
        mMode = mTemporal ? "temporal" : "channel";
        mFields = {PluginField("mode", mMode.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mMode.size() + 1)),
            PluginField("relu", &mRelu, PluginFieldType::kINT32, 1),
            PluginField("ratio", &mRatio, PluginFieldType::kINT32, 1),
            PluginField("frames_out", &mFramesOut, PluginFieldType::kINT32, 1)};
    }
    bool mTemporal;
    int32_t mRelu;
    int32_t mRatio;
    int32_t mFramesOut;
    std::string mMode;
};

// ---------------------------------------------------------------------------------------------
// CalibratedConv(x, alpha, W, B; strides, pads, dilations, group, cal_dim)

class CalibratedConvPlugin : public PluginBase<CalibratedConvPlugin>
{
public:
    static constexpr char const* kNAME = "CalibratedConv";

    explicit CalibratedConvPlugin(Fields const& f)
        : mStrides(f.ints("strides", {1, 1}))
        , mPads(f.ints("pads", {0, 0, 0, 0}))
        , mDilations(f.ints("dilations", {1, 1}))
        , mGroup(f.one("group", 1))
        , mCalDim(f.text("cal_dim", "cin"))
    {
        mStrides.resize(2, 1);
        mPads.resize(4, 0);
        mDilations.resize(2, 1);
        setFields();
    }
    CalibratedConvPlugin(CalibratedConvPlugin const& other)
        : PluginBase<CalibratedConvPlugin>()
        , mStrides(other.mStrides)
        , mPads(other.mPads)
        , mDilations(other.mDilations)
        , mGroup(other.mGroup)
        , mCalDim(other.mCalDim)
    {
        setFields();
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& eb) noexcept override
    {
        if (nbInputs != 4 || inputs[0].nbDims != 4 || inputs[2].nbDims != 4 || !inputs[2].d[2]->isConstant()
            || !inputs[2].d[3]->isConstant())
        {
            return -1;
        }
        outputs[0].nbDims = 4;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = inputs[2].d[0];
        for (int i = 0; i < 2; ++i)
        {
            int64_t const k = inputs[2].d[2 + i]->getConstantValue();
            int64_t const extra = mPads[i] + mPads[i + 2] - mDilations[i] * (k - 1) - 1;
            auto const* padded = eb.operation(DimensionOperation::kSUM, *inputs[0].d[2 + i], *eb.constant(extra));
            auto const* steps = eb.operation(DimensionOperation::kFLOOR_DIV, *padded, *eb.constant(mStrides[i]));
            outputs[0].d[2 + i] = eb.operation(DimensionOperation::kSUM, *steps, *eb.constant(1));
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& x = inputDesc[0].dims;
        Dims const& w = inputDesc[2].dims;
        Dims const& y = outputDesc[0].dims;
        long long const total = 1LL * y.d[0] * y.d[1] * y.d[2] * y.d[3];
        adaedge_calibrated_conv<<<launchBlocks(total), 256, 0, stream>>>(static_cast<float const*>(inputs[0]),
            static_cast<float const*>(inputs[2]), static_cast<float const*>(inputs[1]),
            static_cast<float const*>(inputs[3]), static_cast<float*>(outputs[0]), static_cast<int>(x.d[0]),
            static_cast<int>(x.d[1]), static_cast<int>(x.d[2]), static_cast<int>(x.d[3]), static_cast<int>(w.d[0]),
            mGroup, static_cast<int>(w.d[2]), static_cast<int>(w.d[3]), mStrides[0], mStrides[1], mPads[0], mPads[1],
            mDilations[0], mDilations[1], static_cast<int>(y.d[2]), static_cast<int>(y.d[3]), mCalDim == "cin" ? 1 : 0);
        return cudaPeekAtLastError() == cudaSuccess ? 0 : -1;
    }

private:
    void setFields()
    {
        mFields = {PluginField("strides", mStrides.data(), PluginFieldType::kINT32, 2),
            PluginField("pads", mPads.data(), PluginFieldType::kINT32, 4),
            PluginField("dilations", mDilations.data(), PluginFieldType::kINT32, 2),
            PluginField("group", &mGroup, PluginFieldType::kINT32, 1),
            PluginField("cal_dim", mCalDim.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mCalDim.size() + 1))};
    }
    std::vector<int32_t> mStrides;
    std::vector<int32_t> mPads;
    std::vector<int32_t> mDilations;
    int32_t mGroup;
    std::string mCalDim;
};

// ---------------------------------------------------------------------------------------------
// creators

template <typename Plugin>
class Creator : public IPluginCreatorV3One
{
public:
    explicit Creator(std::vector<PluginField> fields)
        : mFields(std::move(fields))
    {
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }
    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override
    {
        return new (std::nothrow) Plugin(Fields{fc});
    }
    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mCollection;
    }
    AsciiChar const* getPluginName() const noexcept override
    {
        return Plugin::kNAME;
    }
    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kVERSION;
    }
    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kNAMESPACE;
    }

private:
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

} // namespace
} // namespace adaedge

extern "C" TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {}

extern "C" TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    using nvinfer1::PluginField;
    using nvinfer1::PluginFieldType;
    static adaedge::Creator<adaedge::CheapFillPlugin> cheapFill({PluginField("mode", nullptr, PluginFieldType::kCHAR, 0),
        PluginField("relu", nullptr, PluginFieldType::kINT32, 1), PluginField("ratio", nullptr, PluginFieldType::kINT32, 1),
        PluginField("frames_out", nullptr, PluginFieldType::kINT32, 1)});
    static adaedge::Creator<adaedge::CalibratedConvPlugin> calibratedConv(
        {PluginField("strides", nullptr, PluginFieldType::kINT32, 2), PluginField("pads", nullptr, PluginFieldType::kINT32, 4),
            PluginField("dilations", nullptr, PluginFieldType::kINT32, 2),
            PluginField("group", nullptr, PluginFieldType::kINT32, 1),
            PluginField("cal_dim", nullptr, PluginFieldType::kCHAR, 0)});
    static nvinfer1::IPluginCreatorInterface* creators[] = {&cheapFill, &calibratedConv};
    nbCreators = 2;
    return creators;
}
