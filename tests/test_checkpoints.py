"""Checkpoint formats, the Hub path (offline, real huggingface_hub cache), errors and `dvt-timm convert`."""
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import dvt_timm  # noqa: F401
from dvt_timm import CheckpointError, DenoisedViT
from dvt_timm.checkpoint import read_denoiser_checkpoint
from dvt_timm.cli import main as cli_main
from helpers import populate_hf_cache, write_authors_checkpoint


@pytest.fixture()
def authors_file(tmp_path):
    path = tmp_path / 'vit_small_patch14_dinov2.lvd142m.pth'
    return path, write_authors_checkpoint(path, C=384, grid=37)


@torch.inference_mode()
def test_save_and_from_pretrained_round_trip(tmp_path, vits_checkpoint, authors_file, photos):
    model = DenoisedViT('vit_small_patch14_dinov2.lvd142m', backbone_checkpoint=vits_checkpoint,
                        denoiser_checkpoint=authors_file[0]).eval()
    out_dir = tmp_path / 'saved'
    model.save_pretrained(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    size = (out_dir / 'model.safetensors').stat().st_size
    assert size < 12e6, size  # the denoiser only, never the backbone
    config = json.loads((out_dir / 'config.json').read_text())
    assert config == {'backbone': 'vit_small_patch14_dinov2.lvd142m', 'embed_dim': 384, 'format_version': 1,
                      'grid_size': 37, 'num_heads': 6, 'patch_size': 14}
    loaded = DenoisedViT.from_pretrained(out_dir, backbone_checkpoint=vits_checkpoint).eval()
    assert torch.equal(loaded.forward_features(photos), model.forward_features(photos))
    # A config that records the training size keeps it through from_pretrained and save_pretrained.
    (out_dir / 'config.json').write_text(json.dumps({**config, 'input_size': 448}))
    sized = DenoisedViT.from_pretrained(out_dir, backbone_checkpoint=vits_checkpoint)
    assert sized.pretrained_cfg['input_size'] == (3, 448, 448)
    sized.save_pretrained(tmp_path / 'again')
    assert json.loads((tmp_path / 'again' / 'config.json').read_text())['input_size'] == 448
    # the same directory also loads through the timm path
    import timm
    via_timm = timm.create_model('dvt_vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint,
                                 denoiser_checkpoint=out_dir).eval()
    assert torch.equal(via_timm.feature_map(photos), model.feature_map(photos))


def test_hub_path_offline_from_cache(tmp_path, vits_checkpoint, authors_file):
    """timm.create_model(pretrained=True) and from_pretrained(repo_id) resolve through huggingface_hub's
    cache with HF_HUB_OFFLINE=1: an authors' file in `jjiaweiyang/DVT` and a repo in our format."""
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    cache = tmp_path / 'hf_cache'
    populate_hf_cache(cache, 'jjiaweiyang/DVT', {'voc_denoised/vit_small_patch14_dinov2.lvd142m.pth': authors_file[0]})
    populate_hf_cache(cache, 'someone/dvt-vits', {'config.json': ours / 'config.json',
                                                 'model.safetensors': ours / 'model.safetensors'})
    script = textwrap.dedent(f'''
        import timm, torch, dvt_timm
        from dvt_timm import DenoisedViT
        m = timm.create_model('dvt_vit_small_patch14_dinov2', pretrained=True, backbone_checkpoint={str(vits_checkpoint)!r})
        sd = torch.load({str(authors_file[0])!r}, weights_only=True)['denoiser']
        assert torch.equal(m.denoiser.pos_embed, sd['pos_embed'])
        assert torch.equal(m.denoiser.block.mlp.fc2.weight, sd['denoiser.mlp.fc2.weight'])
        m2 = DenoisedViT.from_pretrained('someone/dvt-vits', backbone_checkpoint={str(vits_checkpoint)!r})
        assert torch.equal(m2.denoiser.block.attn.qkv.weight, sd['denoiser.attn.qkv.weight'])
        try:
            timm.create_model('dvt_vit_base_patch14_dinov2', pretrained=True)
        except OSError as e:
            print('MISSING', e)
        for name, load in (('REPO', lambda: DenoisedViT.from_pretrained('someone/absent')),
                           ('BACKBONE', lambda: DenoisedViT('vit_small_patch14_dinov2.lvd142m', pretrained=True))):
            try:
                load()
            except OSError as e:
                print(name, e)
        print('OK')
    ''')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'hf_home'))
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'OK' in proc.stdout
    # A file absent from the cache fails offline instead of reaching the network, naming what and the way out.
    assert 'MISSING dvt_vit_base_patch14_dinov2.lvd142m_voc: its denoiser could not be fetched' in proc.stdout
    assert 'voc_denoised/vit_base_patch14_dinov2.lvd142m.pth: LocalEntryNotFoundError' in proc.stdout
    assert 'denoiser_checkpoint=' in proc.stdout and 'dvt_vit_small_patch14_dinov2.dvt_timm_photos' in proc.stdout
    assert 'REPO someone/absent: not a local folder, so taken for a Hub repo id, and its denoiser could not be ' \
           'fetched (LocalEntryNotFoundError' in proc.stdout
    assert 'BACKBONE vit_small_patch14_dinov2.lvd142m: its pretrained weights could not be fetched' in proc.stdout
    assert 'pass backbone_checkpoint= (--backbone-checkpoint)' in proc.stdout


def test_mismatched_embed_dim_names_both_values(tmp_path):
    path = tmp_path / 'vit_base_patch14_dinov2.lvd142m.pth'
    write_authors_checkpoint(path, C=768, grid=37)
    with pytest.raises(CheckpointError, match=r'embed_dim is 768 but backbone .* needs 384'):
        DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=path)


def test_mismatched_patch_size_names_both_values(tmp_path):
    path = tmp_path / 'denoiser.pth'
    write_authors_checkpoint(path, C=384, grid=32)  # the authors' 32x32 embeddings are their patch-16 models'
    with pytest.raises(CheckpointError, match=r'patch_size is 16 but backbone .* needs 14'):
        DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=path)


def test_a_denoiser_of_another_grid_size_loads_through_every_path(tmp_path):
    """The position embedding is resized to any patch grid, so its stored size is the checkpoint's to choose."""
    saved = DenoisedViT('vit_small_patch14_dinov2', grid_size=16)
    saved.save_pretrained(tmp_path / 'ours')
    for loaded in (timm.create_model('dvt_vit_small_patch14_dinov2', denoiser_checkpoint=tmp_path / 'ours'),
                   DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=tmp_path / 'ours'),
                   DenoisedViT.from_pretrained(tmp_path / 'ours', pretrained=False)):  # offline: a random backbone
        assert loaded.denoiser.grid_size == 16
        assert torch.equal(loaded.denoiser.pos_embed, saved.denoiser.pos_embed)


def test_checkpoint_for_another_backbone(tmp_path, authors_file):
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    with pytest.raises(CheckpointError, match='trained for backbone vit_small_patch14_dinov2'):
        DenoisedViT('vit_small_patch14_reg4_dinov2', denoiser_checkpoint=ours)


def test_checkpoint_for_other_weights_of_the_same_architecture(tmp_path):
    """The authors' MAE denoiser is no denoiser for DINO's ViT-B/16 (same shapes, other weights); converting it
    records the backbone it is for."""
    mae = tmp_path / 'vit_base_patch16_224.mae.pth'
    write_authors_checkpoint(mae, C=768, grid=32)
    for backbone in ('vit_base_patch16_224.dino', 'vit_base_patch16_224'):  # no tag: timm's default, not MAE
        with pytest.raises(CheckpointError, match=f'trained for backbone vit_base_patch16_224.mae, not {backbone}$'):
            DenoisedViT(backbone, denoiser_checkpoint=mae)
    cli_main(['convert', str(mae), str(tmp_path / 'ours'), '--model', 'vit_base_patch16_224.mae'])
    assert json.loads((tmp_path / 'ours' / 'config.json').read_text())['backbone'] == 'vit_base_patch16_224.mae'


@pytest.mark.parametrize('kind', ['pth', 'safetensors', 'config'])
def test_corrupt_or_truncated_file_names_the_file(tmp_path, authors_file, kind):
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    target = {'pth': authors_file[0], 'safetensors': ours / 'model.safetensors', 'config': ours / 'config.json'}[kind]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    source = authors_file[0] if kind == 'pth' else ours
    with pytest.raises(CheckpointError, match=str(target.name)):
        DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=source)
    if kind == 'pth':  # bytes that are no pickle at all: said in words, not as a bare KeyError number
        target.write_bytes(b'hello world, not a checkpoint')
        with pytest.raises(CheckpointError, match='not a checkpoint that can be read safely') as err:
            DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=source)
        assert 'weights_only=False' not in str(err.value)
        torch.save({'denoiser': {}, 'when': datetime.date(2024, 1, 1)}, target)  # an object: never unpickled
        with pytest.raises(CheckpointError, match='Unsupported global: GLOBAL datetime.date') as err:
            DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=source)
        assert 'weights_only=False' not in str(err.value)


def test_config_with_a_bad_input_size_is_refused(tmp_path, authors_file):
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    config = json.loads((ours / 'config.json').read_text())
    (ours / 'config.json').write_text(json.dumps({**config, 'input_size': 450}))
    with pytest.raises(CheckpointError, match=r'config.json: input_size 450 is not a positive multiple of the patch size 14'):
        DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=ours)


def test_backbone_checkpoint_errors(tmp_path, vits_checkpoint):
    with pytest.raises(CheckpointError, match='does not fit backbone vit_base_patch14_dinov2') as err:
        DenoisedViT('vit_base_patch14_dinov2', backbone_checkpoint=vits_checkpoint)
    assert len(str(err.value).splitlines()) <= 7  # not torch's list of every mismatched tensor
    with pytest.raises(CheckpointError, match='is a folder; give the checkpoint file'):
        DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=tmp_path)
    with pytest.raises(FileNotFoundError, match='missing.safetensors'):
        DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=tmp_path / 'missing.safetensors')


def test_a_file_that_is_not_backbone_weights_says_what_it_is(tmp_path, authors_file):
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    with pytest.raises(CheckpointError, match='tensor.pth: holds a Tensor, not a state dict'):
        DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=tmp_path / 'tensor.pth')
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    for denoiser_file in (ours / 'model.safetensors', authors_file[0]):
        with pytest.raises(CheckpointError, match='is a denoiser checkpoint, not backbone weights; pass it as '
                                                  'denoiser_checkpoint'):
            DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=denoiser_file)


def test_backbone_weights_given_as_the_denoiser_say_what_they_are(tmp_path, vits_checkpoint):
    torch.save({'model': load_file(str(vits_checkpoint))}, tmp_path / 'backbone.pth')
    for backbone_file in (vits_checkpoint, tmp_path / 'backbone.pth'):
        with pytest.raises(CheckpointError, match=r'holds backbone weights \(patch_embed, blocks\), not a denoiser; '
                                                  'pass it as backbone_checkpoint'):
            DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=backbone_file)


def test_a_whole_model_state_dict_given_as_the_denoiser_says_how_to_load_it(tmp_path, vits_checkpoint):
    """`model.state_dict()` holds the backbone too: timm's checkpoint_path= loads it, not the denoiser's paths
    (which include timm's `pretrained_cfg_overlay=dict(file=...)`)."""
    model = timm.create_model('dvt_vit_small_patch14_dinov2', num_classes=0)
    torch.save(model.state_dict(), tmp_path / 'whole.pth')
    save_file(model.state_dict(), tmp_path / 'whole.safetensors')
    for path in (tmp_path / 'whole.pth', tmp_path / 'whole.safetensors'):
        with pytest.raises(CheckpointError, match=r'whole DenoisedViT state dict .*checkpoint_path='):
            timm.create_model('dvt_vit_small_patch14_dinov2', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              backbone_checkpoint=vits_checkpoint)
        loaded = timm.create_model('dvt_vit_small_patch14_dinov2', num_classes=0, checkpoint_path=str(path))
        assert torch.equal(loaded.denoiser.pos_embed, model.denoiser.pos_embed)


def test_a_pth_of_our_own_layout_loads(tmp_path, authors_file):
    """`torch.save(model.denoiser.state_dict(), ...)` loads back (safetensors via save_pretrained is preferred)."""
    model = DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0])
    torch.save(model.denoiser.state_dict(), tmp_path / 'denoiser.pth')
    again = DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=tmp_path / 'denoiser.pth')
    theirs, ours = model.denoiser.state_dict(), again.denoiser.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_save_pretrained_warns_that_a_trainable_backbone_is_not_saved(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        DenoisedViT('vit_small_patch14_dinov2').save_pretrained(tmp_path / 'frozen')
        assert 'trainable here' not in caplog.text
        DenoisedViT('vit_small_patch14_dinov2', freeze_backbone=False).save_pretrained(tmp_path / 'tuned')
        assert 'writes the denoiser only: backbone parameters are trainable here (cls_token, pos_embed' in caplog.text
        caplog.clear()
        DenoisedViT('vit_small_patch14_dinov2', num_classes=5).save_pretrained(tmp_path / 'probe')  # a new head
    assert 'trainable here (head.weight, head.bias)' in caplog.text


def test_a_dvt_model_name_is_not_a_backbone():
    for pretrained in (False, True):  # with pretrained, found before anything is fetched
        with pytest.raises(ValueError, match='this is a DenoisedViT already .*: build dvt_\\* models with '
                                             'timm.create_model, or give DenoisedViT the plain backbone, '
                                             'vit_small_patch14_dinov2.lvd142m'):
            DenoisedViT('dvt_vit_small_patch14_dinov2', pretrained=pretrained)


def test_a_model_that_is_not_a_vit_is_named_before_any_download(monkeypatch):
    monkeypatch.setattr(timm.models._builder, 'load_pretrained', lambda *a, **k: pytest.fail('fetched weights'))
    for name in ('swin_tiny_patch4_window7_224', 'resnet18'):
        with pytest.raises(ValueError, match='is not a ViT with patch tokens'):
            DenoisedViT(name, pretrained=True)


def test_backbone_checkpoint_with_a_new_head_or_input_channels(vits_checkpoint):
    """As timm loads pretrained weights: a fresh head for another `num_classes` or `global_pool='map'`, the first
    conv's RGB filters summed for one input channel, and every other weight from the file."""
    ref = load_file(str(vits_checkpoint))
    model = DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint, num_classes=10, in_chans=1,
                        global_pool='map').eval()
    sd = model.backbone.state_dict()
    assert sd['head.weight'].shape == (10, 384) and 'head.weight' not in ref
    torch.testing.assert_close(sd['patch_embed.proj.weight'], ref['patch_embed.proj.weight'].sum(1, keepdim=True))
    assert all(torch.equal(sd[k], v) for k, v in ref.items() if k != 'patch_embed.proj.weight')
    x = torch.randn(1, 1, 56, 70)
    with torch.no_grad():  # the 'map' head pools patch tokens, so forward reads the denoised ones, as in timm
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
        assert not torch.allclose(model(x), model.denoise(False)(x))


def test_pooling_that_drops_the_final_norm_is_refused():
    with pytest.raises(ValueError, match='fc_norm=False'):
        DenoisedViT('vit_small_patch14_dinov2', global_pool='avg')
    DenoisedViT('vit_small_patch14_dinov2', global_pool='avg', fc_norm=False)


def test_corrupt_config_through_from_pretrained_names_the_file(tmp_path, authors_file):
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    (ours / 'config.json').write_text('{"backbone": ')
    with pytest.raises(CheckpointError, match='ours/config.json: corrupt config'):
        DenoisedViT.from_pretrained(ours)


@pytest.mark.parametrize('change, message', [
    (lambda c: [c], 'expected a JSON object, got a list'),
    (lambda c: {**c, 'backbone': None}, 'backbone must be a timm model name, got None'),
    (lambda c: {**c, 'embed_dim': '384'}, "embed_dim must be a positive integer, got '384'"),
    (lambda c: {**c, 'format_version': 'v2'}, "format_version must be a positive integer, got 'v2'"),
])
def test_config_values_of_the_wrong_type_name_the_file_and_key(tmp_path, authors_file, change, message):
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    config = json.loads((ours / 'config.json').read_text())
    (ours / 'config.json').write_text(json.dumps(change(config)))
    with pytest.raises(CheckpointError, match=f'config.json: {re.escape(message)}'):
        DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=ours)


def test_config_json_only_says_what_the_denoiser_is(tmp_path, authors_file, monkeypatch):
    """Entries of a (downloaded) config.json beyond the denoiser's own never reach the model's options."""
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    config = json.loads((ours / 'config.json').read_text())
    extra = dict(pretrained=False, dynamic_img_size=False, foo=1, pretrained_cfg_overlay=dict(mean=[0, 0, 0]))
    (ours / 'config.json').write_text(json.dumps({**config, **extra}))
    built = []
    create = dvt_timm.model._create_backbone
    monkeypatch.setattr(dvt_timm.model, '_create_backbone', lambda name, pretrained, kwargs: (
        built.append((pretrained, dict(kwargs))) or create(name, False, kwargs)))  # offline: never fetch
    model = DenoisedViT.from_pretrained(ours)
    assert built[-1] == (True, {'dynamic_img_size': True}) and model.dynamic_img_size
    assert tuple(model.pretrained_cfg['mean']) == timm.get_pretrained_cfg('vit_small_patch14_dinov2').mean
    # what the caller passes does reach it
    padded = DenoisedViT.from_pretrained(ours, pretrained=False, dynamic_img_pad=True, grid_size=37)
    assert built[-1] == (False, {'dynamic_img_size': True, 'dynamic_img_pad': True})
    assert padded.backbone.patch_embed.dynamic_img_pad


def test_an_interrupted_or_failed_save_leaves_the_folder_loadable(tmp_path, authors_file, monkeypatch):
    ours = tmp_path / 'ours'
    model = DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0])
    model.save_pretrained(ours)
    before = {p.name: p.read_bytes() for p in ours.iterdir()}
    assert sorted(before) == ['README.md', 'config.json', 'model.safetensors']
    pruned = DenoisedViT('vit_small_patch14_dinov2').eval()
    pruned.prune_intermediate_layers([5])  # block 5 only: the denoiser goes
    with pytest.raises(RuntimeError, match='no denoiser to save'):
        pruned.save_pretrained(ours)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr('dvt_timm.checkpoint.save_file', killed)
    with pytest.raises(KeyboardInterrupt):
        DenoisedViT('vit_small_patch14_dinov2').save_pretrained(ours)
    assert {p.name: p.read_bytes() for p in ours.iterdir()} == before  # no temporary file left either
    DenoisedViT.from_pretrained(ours, pretrained=False)


def test_convert_overwrite_writes_a_new_model_card(tmp_path):
    for model, C in (('vit_base_patch14_dinov2', 768), ('vit_small_patch14_dinov2', 384)):
        src = tmp_path / f'{model}.lvd142m.pth'
        write_authors_checkpoint(src, C=C, grid=37)
        cli_main(['convert', str(src), str(tmp_path / 'ours'), '--model', model, '--overwrite'])
    card = (tmp_path / 'ours' / 'README.md').read_text()
    assert 'vit_small_patch14_dinov2.lvd142m' in card and 'vit_base' not in card


def test_from_pretrained_of_a_folder_without_config_says_so(tmp_path, authors_file, vits_checkpoint):
    ours = tmp_path / 'ours'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(ours)
    (ours / 'config.json').unlink()
    with pytest.raises(CheckpointError, match="ours: no config.json naming the backbone; load these weights with "
                                              "DenoisedViT\\('<backbone>', denoiser_checkpoint=...\\)"):
        DenoisedViT.from_pretrained(ours, backbone_checkpoint=vits_checkpoint)
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=ours)  # which loads them


def test_from_pretrained_of_a_mistyped_folder_says_so(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='no denoiser folder at .*runs/typo/denoiser'):
        DenoisedViT.from_pretrained(str(tmp_path / 'runs' / 'typo' / 'denoiser'))
    # 'runs/denoisr' is a valid repo id too; with a local runs/ folder it is a typo, found without the Hub.
    (tmp_path / 'runs').mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr('dvt_timm.model.fetch_denoiser', lambda *a, **k: pytest.fail('asked the Hub'))
    with pytest.raises(FileNotFoundError, match='no denoiser folder at runs/denoisr .*not taken for a Hub repo id'):
        DenoisedViT.from_pretrained('runs/denoisr')
    with pytest.raises(FileNotFoundError, match=r'no denoiser folder at denoisr, and it is not a Hub repo id \(user/'):
        DenoisedViT.from_pretrained('denoisr')  # a one-part name is never a denoiser repo on the Hub


def test_saved_model_card_names_the_backbone(tmp_path, authors_file):
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(tmp_path / 'ours')
    card = (tmp_path / 'ours' / 'README.md').read_text()
    assert 'for the timm backbone\n`vit_small_patch14_dinov2`' in card and 'see config.json' not in card


def test_upload_denoiser_sends_the_model_not_the_training_state(tmp_path, authors_file, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects
    from dvt_timm.hub import upload_denoiser
    folder = tmp_path / 'run'
    DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(folder)
    (folder / 'checkpoint.pt').write_bytes(b'optimizer state')
    (folder / 'log.jsonl').write_text('{}')
    sent = {}
    monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kw: sent.update(repo=repo_id))
    monkeypatch.setattr(HfApi, 'upload_folder', lambda self, **kw: sent.update(kw) or 'commit-url')
    assert upload_denoiser(folder, 'me/denoiser') == 'commit-url' and sent['repo'] == 'me/denoiser'
    files = sorted(filter_repo_objects([p.name for p in folder.iterdir()], allow_patterns=sent['allow_patterns']))
    assert files == ['README.md', 'config.json', 'model.safetensors']
    (folder / 'model.safetensors').write_bytes(b'broken')
    sent.clear()
    with pytest.raises(CheckpointError, match='model.safetensors'):
        upload_denoiser(folder, 'me/denoiser')
    assert not sent  # nothing is created or sent for a folder that does not load


def test_push_to_hub_sends_what_save_pretrained_writes(tmp_path, authors_file, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    sent = {}

    def upload_folder(self, repo_id, folder_path, **kw):
        sent.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()}, repo=repo_id)
        return 'commit-url'
    monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    model = DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0])
    assert model.push_to_hub('me/dvt-vits') == 'commit-url' and sent.pop('repo') == 'me/dvt-vits'
    assert sorted(sent) == ['README.md', 'config.json', 'model.safetensors']
    assert json.loads(sent['config.json'])['backbone'] == 'vit_small_patch14_dinov2'
    assert b'DenoisedViT.from_pretrained("me/dvt-vits")' in sent['README.md']  # the card loads from the repo


def test_a_revision_in_the_repo_id_and_another_as_an_argument_is_refused():
    from dvt_timm.hub import split_repo_revision
    assert split_repo_revision('me/x@v1') == split_repo_revision('me/x@v1', 'v1') == ('me/x', 'v1')
    assert split_repo_revision('me/x', 'v2') == ('me/x', 'v2')
    with pytest.raises(ValueError, match=r"two revisions for me/x: @v1 in the name and revision='v2'"):
        DenoisedViT.from_pretrained('me/x@v1', revision='v2')


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / 'opaque.pth'
    torch.save({'denoiser': {'pos_embed': torch.zeros(1, 4, 8)}, 'args': _Opaque()}, path)
    with pytest.raises(CheckpointError, match='opaque.pth'):
        read_denoiser_checkpoint(path)
    # A pickle that would run a command when unpickled: never run, and the message keeps torch's reason.
    torch.save({'denoiser': {}, 'payload': _RunsACommand(str(tmp_path / 'ran'))}, path)
    with pytest.raises(CheckpointError, match='GLOBAL posix.system') as err:
        read_denoiser_checkpoint(path)
    assert 'weights_only' not in str(err.value) and not (tmp_path / 'ran').exists()


class _RunsACommand:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _Opaque:  # an arbitrary class: weights_only loading must refuse to unpickle it
    pass


def test_cli_verbose_flag_goes_before_or_after_the_command():
    from dvt_timm.cli import build_parser
    for argv in (['-v', 'convert', 'a.pth', 'out', '--model', 'x'], ['convert', 'a.pth', 'out', '--model', 'x', '-v']):
        assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(['convert', 'a.pth', 'out', '--model', 'x']).verbose is False


@pytest.mark.parametrize('command', [['convert', 'a.pth', '{out}', '--model', 'x'],
                                     ['denoise-images', '--model', 'x', '--images', 'd', '--out', '{out}'],
                                     ['train-denoiser', '--data', 'd', '--model', 'x', '--out', '{out}']])
def test_cli_output_folder_that_is_a_file_is_named(tmp_path, capsys, command):
    (tmp_path / 'notes.txt').write_text('keep me')
    for out, message in ((tmp_path / 'notes.txt', 'notes.txt is a file, not a folder'),
                         (tmp_path / 'notes.txt' / 'run', 'cannot make a folder in {}: it is a file')):
        with pytest.raises(SystemExit):  # argparse's usage error, before any model loads
            cli_main([a.format(out=out) for a in command])
        assert message.format(tmp_path / 'notes.txt') in capsys.readouterr().err
    assert (tmp_path / 'notes.txt').read_text() == 'keep me'
    # A folder without write permission (faked: as root every folder is writable) is named up front too.
    (tmp_path / 'locked').mkdir()
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, 'access', lambda path, mode: Path(path) != tmp_path / 'locked' and real_access(path, mode))
        with pytest.raises(SystemExit):
            cli_main([a.format(out=tmp_path / 'locked' / 'run') for a in command])
    assert f'no permission to write in {tmp_path / "locked"}' in capsys.readouterr().err


def test_cli_convert(tmp_path, authors_file, capsys):
    out = tmp_path / 'converted'
    assert cli_main(['convert', str(authors_file[0]), str(out), '--model', 'dvt_vit_small_patch14_dinov2']) == 0
    sd, cfg = read_denoiser_checkpoint(out)
    assert cfg.backbone == 'vit_small_patch14_dinov2.lvd142m' and cfg.embed_dim == 384
    assert torch.equal(sd['block.attn.proj.weight'], authors_file[1]['denoiser.attn.proj.weight'])
    assert cli_main(['convert', str(authors_file[0]), str(tmp_path / 'bad'), '--model', 'vit_base_patch14_dinov2']) == 1
    assert 'embed_dim is 384 but backbone vit_base_patch14_dinov2.lvd142m needs 768' in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()
    # A folder that already holds a denoiser (a training run, say) is not overwritten unless asked.
    before = (out / 'model.safetensors').read_bytes()
    assert cli_main(['convert', str(authors_file[0]), str(out), '--model', 'vit_small_patch14_dinov2']) == 1
    assert 'already holds a denoiser (config.json, model.safetensors)' in capsys.readouterr().err
    assert (out / 'model.safetensors').read_bytes() == before
    assert cli_main(['convert', str(authors_file[0]), str(out), '--model', 'vit_small_patch14_dinov2',
                     '--overwrite']) == 0


def test_saved_files_get_the_usual_permissions(tmp_path, authors_file):
    old = os.umask(0o022)
    try:
        DenoisedViT('vit_small_patch14_dinov2', denoiser_checkpoint=authors_file[0]).save_pretrained(tmp_path / 'o')
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / 'o').iterdir()} == {'0o644'}
