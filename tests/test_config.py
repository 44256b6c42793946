import pytest

from salnet.config import Config, ConfigError, describe_keys, load_config, save_config

from conftest import REPO, run_py


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_yaml_then_overrides_resolve_to_typed_values(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.01\n  name: sgd\ntrain:\n  amp: fp16\n  steps: 10\n")
    cfg = load_config(
        path,
        [
            "optim.lr=3e-4",
            "train.amp=bf16",
            "model.ppm_bins=[1,2,4]",
            "train.compile=true",
            "optim.grad_clip=null",
            "data.augment.scale=[0.5,1]",
            "model.backbone.name=resnet18",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == "sgd"  # from the file, untouched by overrides
    assert cfg.train.amp == "bf16" and cfg.train.steps == 10
    assert cfg.model.ppm_bins == [1, 2, 4]
    assert cfg.train.compile is True
    assert cfg.optim.grad_clip is None
    assert cfg.data.augment.scale == (0.5, 1.0)
    assert cfg.model.backbone.name == "resnet18"
    assert cfg.model.fpn_width == Config().model.fpn_width  # default kept


def test_yaml_round_trip_and_atomic_save(tmp_path):
    cfg = load_config(None, ["optim.lr=0.5", "name=x"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(str(out)) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_unknown_key_from_command_line_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=3e-4"])
    msg = str(e.value)
    assert "unknown key 'optim.lrr'" in msg
    assert "command line" in msg and "optim.lrr=3e-4" in msg
    assert "did you mean 'optim.lr'" in msg
    assert "weight_decay" in msg  # lists the valid keys


def test_unknown_key_from_file_names_the_file(tmp_path):
    path = write(tmp_path, "model:\n  backbone:\n    nam: resnet18\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "unknown key 'model.backbone.nam'" in msg and path in msg and "model.backbone.name" in msg


def test_unknown_section_lists_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*Valid keys: name, out_dir, data, model"):
        load_config(write(tmp_path, "optimizer: {lr: 1}\n"))


def test_wrong_type_names_key_source_and_expected_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "optim:\n  lr: fast\n"))
    msg = str(e.value)
    assert "'optim.lr'" in msg and "'fast'" in msg and "expected float" in msg and "c.yaml" in msg
    with pytest.raises(ConfigError, match=r"'train.amp'.*command line.*expected one of 'fp32', 'bf16', 'fp16'"):
        load_config(None, ["train.amp=bf17"])
    with pytest.raises(ConfigError, match=r"'model.ppm_bins'.*expected list\[int\]"):
        load_config(None, ["model.ppm_bins=3"])


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = write(tmp_path, "optim:\n  lr: [1, 2\ntrain: {}\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line \d+, column \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="'optim.lr' is a value, not a section"):
        load_config(None, ["optim.lr=1", "optim.lr.x=2"])


def test_every_key_is_documented():
    rows = describe_keys()
    assert len(rows) > 40
    undocumented = [key for key, _, _, desc in rows if not desc]
    assert undocumented == []


def test_shipped_configs_are_valid():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ holds no YAML"
    for path in configs:
        load_config(str(path))


def test_cli_prints_resolved_yaml_and_help():
    out = run_py(["-m", "salnet.config", "optim.lr=0.25", "name=abc"]).stdout
    assert load_config(None, ["optim.lr=0.25", "name=abc"]) == Config.model_validate(__import__("yaml").safe_load(out))
    help_text = run_py(["-m", "salnet.config", "--help"]).stdout
    for key, _, _, _ in describe_keys():
        assert key in help_text
    assert "optim.lr" in help_text and "default: 0.0001" in help_text


def test_cli_typo_fails_with_status_2_before_importing_torch():
    proc = run_py(["-m", "salnet.config", "optim.lrr=3e-4"], check=False)
    assert proc.returncode == 2
    assert "did you mean 'optim.lr'" in proc.stderr
    # "Fails in under 5 seconds" is guaranteed structurally, not by a timer: the config path never
    # imports torch (seconds to import), so the error comes before any heavy work.
    probe = (
        "import sys, salnet.config as c\n"
        "try:\n    c.load_config(None, ['optim.lrr=1'])\nexcept c.ConfigError:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'deepspeed')))"
    )
    assert run_py(["-c", probe]).stdout.strip() == "[]"


def test_a_best_metric_that_validation_will_not_compute_fails_when_the_config_loads():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.metrics=[F, MAE]", "eval.best_metric=S"])
    msg = str(e.value)
    assert "eval.best_metric='S' is not computed by eval.metrics=['F', 'MAE']" in msg
    assert "maxF, meanF, adpF, MAE" in msg and "'eval.best_metric=S' from the command line" in msg
    assert load_config(None, ["eval.metrics=[S]", "eval.best_metric=S"]).eval.best_metric == "S"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("name=../x", "name='../x' must be a plain directory name"),
        ("name=a/b", "name='a/b' must be a plain directory name"),
        (
            "optim.lr=.inf",
            "key 'optim.lr' (from the command line: 'optim.lr=.inf') has invalid value inf: Input should be a finite number",
        ),
        ("loss.side_weights=[1, .nan]", "Input should be a finite number"),
        ("data.size=1", "data.size=1 is below the network's minimum input size 32"),
        ("data.multiscale=[64, 8]", "data.multiscale=[64, 8] is below the network's minimum input size 32"),
        ("data.val=[]", "data.val set 'val' lists no shard directories"),
    ],
)
def test_values_that_would_break_the_run_fail_when_the_config_loads(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


def test_salnet_train_reports_a_config_error_before_importing_torch():
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['python -m salnet.train', 'optim.lrr=3e-4']\n"
        "try:\n"
        "    runpy.run_module('salnet.train', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch imported:', 'torch' in sys.modules)\n"
    )
    proc = run_py(["-c", probe], check=False)
    assert "exit 2 torch imported: False" in proc.stdout, proc.stdout + proc.stderr
    assert "did you mean 'optim.lr'?" in proc.stderr


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.steps=10", "train.epochs=2"], "train.steps=10 and train.epochs=2 are both set"),
        (["model.norm=group", "model.gn_groups=24"], "it does not divide model.ppm_width=256, model.fpn_width=256"),
        (["model.norm=group", "model.ppm_branch_width=60", "model.gn_groups=8"], "model.ppm_branch_width=60"),
        (["data.val={}"], "data.val={} names no validation set"),
        (["data.train=[{file}]"], "data.train[0]='{file}' is a file; a shard set is a directory"),
        (["data.val={A: [{file}]}"], "data.val.A[0]='{file}' is a file"),
    ],
)
def test_contradictions_that_need_no_data_fail_when_the_config_loads(tmp_path, overrides, expected):
    file = tmp_path / "train.tar"
    file.write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        load_config(None, [o.replace("{file}", str(file)) for o in overrides])
    assert expected.replace("{file}", str(file)) in str(e.value)


def test_salnet_train_refuses_what_the_machine_cannot_give_in_one_line_before_importing_torch(tmp_path):
    # Each case through salnet.train's main, as a user would meet it: exit 2, one line, no torch.
    (tmp_path / "file").write_text("")
    cases = {
        "train.sync_bn=true": "train.sync_bn=true needs CUDA",
        "out_dir=/proc/salnet-runs": "out_dir='/proc/salnet-runs': the run directory /proc/salnet-runs/run cannot be made",
        f"out_dir={tmp_path}/file/runs": f"'{tmp_path}/file' is not a directory",
    }
    probe = (
        "import runpy, sys\n"
        "for override in sys.argv[1:]:\n"
        "    sys.argv = ['python -m salnet.train', override]\n"
        "    try:\n"
        "        runpy.run_module('salnet.train', run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code, 'torch imported:', 'torch' in sys.modules)\n"
    )
    proc = run_py(["-c", probe, *cases], check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.stdout.splitlines() == ["exit 2 torch imported: False"] * len(cases), proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(cases) and all(line.startswith("python -m salnet.train: ") for line in lines), lines
    for line, expected in zip(lines, cases.values()):
        assert expected in line
    assert not list(tmp_path.glob("**/.salnet-write-test-*"))
