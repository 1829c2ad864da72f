"""An in-process stand-in for the `ray` calls of tests/vendor/openrlhf_remote_rm_utils.py (written for lora_rm's
tests, not vendored): `ray.remote(f)` and `ray.remote(cls)` give an object whose `.remote(...)` runs the call here
and now (a class gives an actor whose methods have `.remote(...)`), and `ray.get(refs)` returns what it is given.
The HTTP requests it leads to are OpenRLHF's own (`request_api_wrapper`)."""

from __future__ import annotations

from typing import Any


class _Remote:
    def __init__(self, target: Any):
        self._target = target

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        made = self._target(*args, **kwargs)
        return _Actor(made) if isinstance(self._target, type) else made


class _Actor:
    def __init__(self, instance: Any):
        self._instance = instance

    def __getattr__(self, name: str) -> _Remote:
        return _Remote(getattr(self._instance, name))


def remote(target: Any) -> _Remote:
    return _Remote(target)


def get(refs: Any) -> Any:
    return refs
