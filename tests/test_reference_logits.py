"""Our model reproduces a PyTorch CvT's logits after tools/convert_weights.py.

The reference is a small Hugging Face `CvtForImageClassification` with random
weights (BatchNorm running statistics included) and its exact GELUs replaced by
the official QuickGELU, saved as a Hugging Face `model.safetensors` folder, as
`pytorch_model.bin`, and under official microsoft/CvT names as a `.pth`.
"""

import os

import numpy as np
import pytest
import yaml

torch = pytest.importorskip('torch', reason='torch is a test-only dependency (requirements-test.txt)')
transformers = pytest.importorskip('transformers', reason='transformers is a test-only dependency '
                                                          '(requirements-test.txt)')

import paddle  # noqa: E402

from config import get_config  # noqa: E402
from cvt import build_cvt, load_pretrained  # noqa: E402
from tools.convert_weights import main as convert_main  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
TOLERANCE = 1e-4

# small models; HF needs DEPTH[i] > i (it indexes the block drop-path rates by stage)
VARIANTS = {
    'cls-token-head': dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3],
                           cls_token=[False, False, True], num_labels=10),
    'mean-pool-head-odd-kv': dict(embed_dim=[12, 24, 32], num_heads=[2, 3, 4], depth=[1, 2, 3],
                                  cls_token=[False, False, False], kernel_qkv=[3, 5, 3],
                                  padding_q=[1, 2, 1], padding_kv=[1, 2, 0], stride_kv=[1, 2, 2],
                                  patch_stride=[4, 2, 1], mlp_ratio=[4.0, 2.0, 3.0], num_labels=7),
}
INPUTS = {'batch-1': (1, 3, 64, 64), 'batch-2': (2, 3, 64, 64), 'non-square': (1, 3, 64, 48)}

# official microsoft/CvT names of Hugging Face names: substring replacements, in order
HF_TO_OFFICIAL = [
    ('cvt.encoder.stages.', 'stage'),
    ('.layers.', '.blocks.'),
    ('.embedding.convolution_embeddings.projection.', '.patch_embed.proj.'),
    ('.embedding.convolution_embeddings.normalization.', '.patch_embed.norm.'),
    ('.convolution_projection.convolution.', '.conv.'),
    ('.convolution_projection.normalization.', '.bn.'),
    ('.attention.attention.convolution_projection_query.', '.attn.conv_proj_q.'),
    ('.attention.attention.convolution_projection_key.', '.attn.conv_proj_k.'),
    ('.attention.attention.convolution_projection_value.', '.attn.conv_proj_v.'),
    ('.attention.attention.projection_query.', '.attn.proj_q.'),
    ('.attention.attention.projection_key.', '.attn.proj_k.'),
    ('.attention.attention.projection_value.', '.attn.proj_v.'),
    ('.attention.output.dense.', '.attn.proj.'),
    ('.intermediate.dense.', '.mlp.fc1.'),
    ('.output.dense.', '.mlp.fc2.'),
    ('.layernorm_before.', '.norm1.'),
    ('.layernorm_after.', '.norm2.'),
]
HF_TOP_TO_OFFICIAL = {'layernorm.': 'norm.', 'classifier.': 'head.'}


def official_name(hf_name: str) -> str:
    for top, official in HF_TOP_TO_OFFICIAL.items():
        if hf_name.startswith(top):
            return official + hf_name[len(top):]
    for old, new in HF_TO_OFFICIAL:
        hf_name = hf_name.replace(old, new)
    return hf_name


def test_official_names_of_the_hf_reference_are_the_official_reference():
    """The helper that writes the official .pth below names things as microsoft/CvT does."""
    def names(file):
        with open(os.path.join(DATA, file)) as listing:
            return sorted(line.split()[0] for line in listing)
    assert sorted(official_name(n) for n in names('hf-cvt-13.state_dict.txt')) == \
        names('official-cvt-13.state_dict.txt')


class QuickGELU(torch.nn.Module):
    """The official CvT activation, x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights at scales where every part of the network shapes the logits:
    attention scores of order 1, norms and BatchNorm statistics far from identity."""
    generator = torch.Generator().manual_seed(seed)

    def randn(tensor):
        return torch.randn(tensor.shape, generator=generator)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith('weight'):  # LayerNorm / BatchNorm scale
                param.copy_(1 + 0.2 * randn(param))
            elif param.ndim == 1:  # biases
                param.copy_(0.1 * randn(param))
            elif name.endswith('cls_token'):
                param.copy_(randn(param))
            else:  # Linear [out, in] and conv [out, in / groups, kh, kw]: unit-variance outputs
                param.copy_(randn(param) / param[0].numel() ** 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * randn(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
                module.num_batches_tracked.fill_(1234)


def our_config_yaml(hf_config, path: str) -> str:
    """A config file for our model equivalent to `hf_config`."""
    model = {
        'NUM_CLASSES': hf_config.num_labels, 'PATCH_SIZE': list(hf_config.patch_sizes),
        'PATCH_STRIDE': list(hf_config.patch_stride), 'PATCH_PADDING': list(hf_config.patch_padding),
        'DIM_EMBED': list(hf_config.embed_dim), 'NUM_HEADS': list(hf_config.num_heads),
        'DEPTH': list(hf_config.depth), 'MLP_RATIO': [float(r) for r in hf_config.mlp_ratio],
        'QKV_BIAS': list(hf_config.qkv_bias), 'CLS_TOKEN': list(hf_config.cls_token),
        'QKV_PROJ_METHOD': list(hf_config.qkv_projection_method),
        'KERNEL_QKV': list(hf_config.kernel_qkv), 'PADDING_Q': list(hf_config.padding_q),
        'PADDING_KV': list(hf_config.padding_kv), 'STRIDE_Q': list(hf_config.stride_q),
        'STRIDE_KV': list(hf_config.stride_kv),
    }
    with open(path, 'w') as out:
        yaml.safe_dump({'MODEL': model}, out)
    return path


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def reference(request, tmp_path_factory):
    """(HF model with QuickGELU, the same with exact GELU, our config file, checkpoint folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf_config = transformers.CvtConfig(**VARIANTS[request.param])
    torch.manual_seed(0)
    model = transformers.CvtForImageClassification(hf_config).eval()
    randomise(model, seed=1)
    exact_gelu = transformers.CvtForImageClassification(hf_config).eval()
    exact_gelu.load_state_dict(model.state_dict())
    for layer in model.modules():
        if isinstance(layer, transformers.models.cvt.modeling_cvt.CvtIntermediate):
            layer.activation = QuickGELU()

    model.save_pretrained(str(folder / 'hf'))
    state = model.state_dict()
    torch.save(state, str(folder / 'pytorch_model.bin'))
    # an official training checkpoint: official names, [out, in] Linear weights,
    # step counters, wrapped and with DataParallel's prefix
    official = {f'module.{official_name(k)}': v for k, v in state.items()}
    torch.save({'epoch': 300, 'state_dict': official}, str(folder / 'CvT-small.pth'))
    cfg = our_config_yaml(hf_config, str(folder / 'small.yaml'))
    return model, exact_gelu, cfg, folder


def hf_logits(model, images: np.ndarray) -> np.ndarray:
    pixels = torch.from_numpy(images)
    with torch.no_grad():
        if model.config.cls_token[-1]:
            return model(pixels).logits.numpy()
        # transformers' head fails without a cls token (it reads outputs[1] of a tuple
        # that leaves the None cls token out), so its mean-pool head is written out here
        feature_map = model.cvt(pixels).last_hidden_state
        tokens = feature_map.flatten(2).transpose(1, 2)
        return model.classifier(model.layernorm(tokens).mean(dim=1)).numpy()


def our_logits(cfg: str, weights: str, images: np.ndarray) -> np.ndarray:
    model = build_cvt(get_config(cfg))
    load_pretrained(model, weights)
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy()


@pytest.mark.parametrize('source', ['hf', 'hf/model.safetensors', 'pytorch_model.bin', 'CvT-small.pth'])
def test_converted_weights_reproduce_the_reference_logits(reference, source, tmp_path):
    model, _, cfg, folder = reference
    dst = str(tmp_path / 'converted.pdparams')
    assert convert_main([str(folder / source), dst, '-cfg', cfg]) == 0
    rng = np.random.default_rng(2)
    for shape in INPUTS.values():
        images = rng.standard_normal(shape).astype('float32')
        want = hf_logits(model, images)
        assert want.std() > 0.1  # logits that vary, so agreement means something
        np.testing.assert_allclose(our_logits(cfg, dst, images), want, rtol=0, atol=TOLERANCE,
                                   err_msg=f'input {shape}')


def test_reference_with_exact_gelu_is_told_apart(reference, tmp_path):
    """The comparison above is sharp enough to see HF's exact GELU instead of QuickGELU."""
    _, exact_gelu, cfg, folder = reference
    dst = str(tmp_path / 'converted.pdparams')
    assert convert_main([str(folder / 'hf'), dst, '-cfg', cfg]) == 0
    images = np.random.default_rng(3).standard_normal(INPUTS['batch-2']).astype('float32')
    difference = np.abs(our_logits(cfg, dst, images) - hf_logits(exact_gelu, images)).max()
    assert difference > 100 * TOLERANCE
