import pytest

import tongyi_local
from tongyi_local import InvalidRequestError, Message, Sampling, Timings


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.0}, "min_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"stop": [""]}, "stop"),
    ({"seed": -3}, "seed"),
])
def test_invalid_sampling_is_rejected_with_the_field_named(kwargs, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        Sampling(**kwargs)


def test_sampling_overrides_and_unknown_options():
    s = Sampling().merged({"temperature": 0, "stop": "END"})
    assert s.greedy and s.stop == ("END",)
    with pytest.raises(InvalidRequestError, match="temprature"):
        Sampling().merged({"temprature": 0})


def test_messages_coerce_from_dicts_and_reject_bad_roles():
    assert Message.coerce({"role": "user", "content": "hi"}) == Message("user", "hi")
    with pytest.raises(InvalidRequestError, match="role"):
        Message("wizard", "hi")


def test_timings_rates():
    t = Timings(prompt_eval_ms=500, prompt_eval_tokens=100, decode_ms=250, decode_tokens=10)
    assert t.prompt_tokens_per_s == pytest.approx(200)
    assert t.decode_tokens_per_s == pytest.approx(40)
    assert Timings().decode_tokens_per_s == 0


def test_the_package_namespace_is_its_public_api_and_the_whole_error_tree():
    import inspect
    import types

    from tongyi_local import errors

    public = {name for name, value in vars(tongyi_local).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public <= set(tongyi_local.__all__), public - set(tongyi_local.__all__)
    tree = {name for name, value in vars(errors).items()
            if inspect.isclass(value) and issubclass(value, errors.TongyiError)}
    assert tree <= set(tongyi_local.__all__), tree - set(tongyi_local.__all__)
    assert len(tongyi_local.__all__) == len(set(tongyi_local.__all__))


def test_public_api_is_exported_and_import_is_light():
    import subprocess
    import sys

    for name in tongyi_local.__all__:
        assert hasattr(tongyi_local, name), name
    probe = ("import sys, tongyi_local; "
             "print(any(m.split('.')[0] in ('llama_cpp', 'gguf', 'numpy') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          text=True).stdout.strip() == "False"
