"""Server-side policy: what each user may do, and how the model is set up (issue: running it for real).

Defaults come from flags (`--models`, `--requests-per-minute`, `--tokens-per-day`,
`--concurrent-streams`, `--system-prompt`); a JSON file (`--policy`) overrides them per user
(the names of `--api-keys`) and sets a system prompt per model:

    {"users":  {"alice": {"requests_per_minute": 30, "tokens_per_day": 200000,
                          "concurrent_streams": 2, "models": ["gpt-4o-mini"],
                          "system_prompt": "You answer for Example Corp."}},
     "models": {"gpt-4o-mini": {"system_prompt": "Be brief."}}}

The system prompt a request gets is the user's, else the model's, else the default. A limit of
0 means no limit; "models" lists the models a user may ask for ("*": any).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import GatewayError

__all__ = ["Policy", "UserPolicy", "PolicyError", "parse_policy"]

_USER_FIELDS = {"requests_per_minute", "tokens_per_day", "concurrent_streams", "models", "system_prompt"}


class PolicyError(ValueError):
    """The policy file says something the gateway cannot follow."""


@dataclass(frozen=True)
class UserPolicy:
    requests_per_minute: int = 0
    tokens_per_day: int = 0
    concurrent_streams: int = 0
    models: frozenset[str] | None = None  # None: any model
    system_prompt: str | None = None


def _user_entry(where: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where} must be an object")
    unknown = set(entry) - _USER_FIELDS
    if unknown:
        raise PolicyError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, value in entry.items():
        if name == "models":
            if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
                raise PolicyError(f"{where}.models must be a list of model names")
            checked[name] = None if "*" in value else frozenset(value)
        elif name == "system_prompt":
            if value is not None and not isinstance(value, str):
                raise PolicyError(f"{where}.system_prompt must be a string")
            checked[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PolicyError(f"{where}.{name} must be a whole number of at least 0")
            checked[name] = value
    return checked


def parse_policy(document: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(per-user overrides, per-model system prompts) from a policy document."""
    if not isinstance(document, dict) or set(document) - {"users", "models"}:
        raise PolicyError('the policy must be an object with "users" and/or "models"')
    users = document.get("users", {})
    models = document.get("models", {})
    if not isinstance(users, dict) or not isinstance(models, dict):
        raise PolicyError('"users" and "models" must be objects')
    overrides = {name: _user_entry(f"users.{name}", entry) for name, entry in users.items()}
    prompts: dict[str, str] = {}
    for model, entry in models.items():
        if not isinstance(entry, dict) or set(entry) - {"system_prompt"} or not isinstance(entry.get("system_prompt"), str):
            raise PolicyError(f'models.{model} must be {{"system_prompt": "..."}}')
        prompts[model] = entry["system_prompt"]
    return overrides, prompts


class Policy:
    def __init__(
        self,
        default: UserPolicy,
        users: Mapping[str, Mapping[str, Any]] | None = None,
        model_prompts: Mapping[str, str] | None = None,
    ) -> None:
        self.default = default
        self._users = {name: dataclasses.replace(default, **fields) for name, fields in (users or {}).items()}
        self._user_prompts = {name: f["system_prompt"] for name, f in (users or {}).items() if "system_prompt" in f}
        self._model_prompts = dict(model_prompts or {})

    def for_user(self, user: str) -> UserPolicy:
        return self._users.get(user, self.default)

    def check_model(self, user: str, model: str) -> None:
        allowed = self.for_user(user).models
        if allowed is not None and model not in allowed:
            raise GatewayError(403, f"The model `{model}` is not available to you.", type="permission_error",
                               param="model", code="model_not_allowed")

    def allows(self, user: str, model: str) -> bool:
        allowed = self.for_user(user).models
        return allowed is None or model in allowed

    def system_prompt(self, user: str, model: str) -> str | None:
        """The user's preset, else the model's, else the default (the most specific wins)."""
        if user in self._user_prompts:
            return self._user_prompts[user]
        return self._model_prompts.get(model, self.default.system_prompt)
