import pytest
import torch

from tmfast.testing import tiny_model
from tmfast import ModelConfig, TMModel, from_hf_gpt2
from tmfast.config import ConfigError
from tmfast.model import tail_only_mask


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=123, n_positions=64, n_embd=48, n_layer=3, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_hf_gpt2_import_matches_transformers_hidden_states(hf_dir):
    from transformers import GPT2Model
    ours, tok = from_hf_gpt2(str(hf_dir))
    theirs = GPT2Model.from_pretrained(hf_dir).eval()
    assert tok is None  # a bare model directory has no tokenizer files
    torch.manual_seed(1)
    x = torch.randn(3, 20, 48)
    with torch.no_grad():
        ref = theirs(inputs_embeds=x).last_hidden_state
        plain = ours.hidden(x)
        conditioned = ours.hidden(x, alpha=torch.rand(3, 20), k=torch.tensor([1, 4, 16]))
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(conditioned, ref, atol=1e-5, rtol=0)  # conditioning starts at identity


def test_hf_import_table_is_normalised_to_mean_wte_norm(hf_dir):
    from transformers import GPT2LMHeadModel
    wte = GPT2LMHeadModel.from_pretrained(hf_dir).transformer.wte.weight.detach()
    model, _ = from_hf_gpt2(str(hf_dir))
    norms = model.table.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(wte.norm(dim=-1).mean())))
    assert not model.table.weight.requires_grad
    cos = torch.nn.functional.cosine_similarity(model.table.weight, wte, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


@pytest.mark.parametrize("film", ["every_block", "input"])
def test_conditioning_is_identity_at_init_and_learnable(film):
    model = TMModel(ModelConfig(vocab_size=50, n_positions=32, n_layer=2, n_head=2, n_embd=16, k_max=8, film=film))
    assert model.tail_film.embed.weight.shape[1] == 2 * 16 * (2 if film == "every_block" else 1)
    x = torch.randn(2, 10, 16)
    a, k = torch.rand(2, 10), torch.tensor([3, 8])
    torch.testing.assert_close(model.hidden(x, alpha=a, k=k), model.hidden(x))
    torch.testing.assert_close(model(x), model.vector_head(model.hidden(x)))
    torch.testing.assert_close(model.vector_head.weight, torch.eye(16))
    # gradients reach the zero-initialised conditioning
    model(x, alpha=a, k=k).pow(2).sum().backward()
    assert model.maturity.fc2.weight.grad.abs().sum() > 0
    assert model.tail_film.embed.weight.grad.abs().sum() > 0


def test_tail_only_mask_blocks_history_for_tail_queries_only():
    m = tail_only_mask(5, torch.tensor([3]))[0, 0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 0],
                             [0, 0, 0, 1, 1]])
    assert torch.equal(m, expected)


def test_tail_only_mask_cuts_the_tail_off_its_history():
    model = tiny_model()
    x = torch.randn(1, 12, 32)
    mask = tail_only_mask(12, torch.tensor([8]))
    y = x.clone()
    y[:, :8] = torch.randn(1, 8, 32)  # another history
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask=mask)[:, 8:], model(y, mask=mask)[:, 8:])
        assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])


@pytest.mark.parametrize("bad, match", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(k_max=0), "k_max"),
    (dict(table_radius=-1.0), "table_radius"),
    (dict(n_layer=0), "n_layer"),
    (dict(film="output"), "film"),
])
def test_bad_model_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**bad)


def test_unknown_config_key():
    with pytest.raises(ConfigError, match="unknown ModelConfig key"):
        ModelConfig.from_dict({"n_layers": 3})
