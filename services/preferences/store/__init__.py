"""All SQL of the preferences service, by area; callers use ``store.<function>``.

The package keeps every statement in one place (``directory``, ``users``,
``account``) while each module stays small; ``common`` holds row mapping and
the per-account change counter every write bumps.
"""

from services.preferences.store.account import (
    account_snapshot_inputs,
    defaults_version,
    delete_profile,
    lock_account_defaults,
    lock_profile,
    permission_sets,
    profile_versions,
    replace_account_defaults,
    save_profile,
)
from services.preferences.store.common import (
    CHANGE_LOG_KEEP,
    Conn,
    account_seq,
    as_json,
    bump_seq,
    changes_since,
    utcnow,
)
from services.preferences.store.directory import (
    get_account,
    get_team,
    get_users,
    require_account,
    upsert_account,
    upsert_team,
    upsert_user,
)
from services.preferences.store.users import (
    account_layers,
    audit,
    batch_inputs,
    forget_choices,
    list_audit,
    lock_user,
    reset_user,
    save_settings,
    set_choices,
    set_topic_sound,
    user_preferences,
)

__all__ = [
    "CHANGE_LOG_KEEP",
    "Conn",
    "account_layers",
    "account_seq",
    "account_snapshot_inputs",
    "as_json",
    "audit",
    "batch_inputs",
    "bump_seq",
    "changes_since",
    "defaults_version",
    "delete_profile",
    "forget_choices",
    "get_account",
    "get_team",
    "get_users",
    "list_audit",
    "lock_account_defaults",
    "lock_profile",
    "lock_user",
    "permission_sets",
    "profile_versions",
    "replace_account_defaults",
    "require_account",
    "reset_user",
    "save_profile",
    "save_settings",
    "set_choices",
    "set_topic_sound",
    "upsert_account",
    "upsert_team",
    "upsert_user",
    "user_preferences",
    "utcnow",
]
