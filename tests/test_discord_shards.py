"""Discord shards across replicas: two real discord.py ``AutoShardedClient`` replicas (one shard each) against the
fake gateway, which routes each guild's events to the shard Discord's formula picks and DMs to shard 0."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from bot.adapters.discord import run_discord, syncs_commands
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from bot.web.health import ADAPTERS
from imagine.task import load_task
from learning.interface import History
from storage import Store
from tests.fakes.discord_gateway import FakeDiscord, FakeUser

TASK = load_task("travel")
SHARDS = 2
GUILD = 1_200_000_000_000_001
USERS = [FakeUser(600 + n, f"user{n}") for n in range(8)]


class ReplicaPolicy:
    """Answers with the replica's name, so each answer shows who gave it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version_id: int | None = None

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        return [self.name for _ in histories]

    async def respond(self, history: History) -> str:
        return self.name

    def close(self) -> None:
        pass


def guilds_per_shard(count: int) -> list[int]:
    """``count`` guild ids on each of the shards (besides the fake's first guild), found by Discord's formula."""
    found: list[int] = []
    candidate = GUILD
    per_shard = {shard: 0 for shard in range(SHARDS)}
    per_shard[FakeDiscord.shard_of(GUILD, SHARDS)] += 1
    while any(n < count for n in per_shard.values()):
        candidate += 1 << 22
        shard = FakeDiscord.shard_of(candidate, SHARDS)
        if per_shard[shard] < count:
            per_shard[shard] += 1
            found.append(candidate)
    return found


async def test_each_guild_is_answered_by_the_replica_running_its_shard(sqlite_store: Store, tmp_path: Path) -> None:
    ADAPTERS.__init__()  # type: ignore[misc]
    async with FakeDiscord(guild_id=GUILD, extra_guild_ids=tuple(guilds_per_shard(2))) as fake:
        stop = asyncio.Event()
        services: list[DialogueService] = []
        runners = []
        for shard in range(SHARDS):
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                data_dir=tmp_path,
                discord_token=SecretStr(fake.token),
                discord_guild_id=GUILD,
                discord_shard_count=SHARDS,
                discord_shard_ids=[shard],
            )
            assert syncs_commands(settings) == (shard == 0)
            service = DialogueService(
                store=sqlite_store, policies=PolicyHolder(ReplicaPolicy(f"shard {shard}")), task=TASK, settings=settings
            )
            services.append(service)
            runners.append(asyncio.create_task(run_discord(service, settings, stop)))
        try:
            await fake.wait_for(lambda: fake.sessions >= SHARDS, what="both replicas to identify")
            assert sorted(fake.shards) == [[0, SHARDS], [1, SHARDS]]  # type: ignore[type-var]
            # The commands were registered once, by the replica with shard 0.
            assert len(fake.calls_to("PUT", rf"/applications/{fake.application_id}/guilds/{GUILD}/commands")) == 1

            for user, guild in zip(USERS, fake.guild_ids, strict=False):
                await fake.send_user_message(user, "hello", mention_bot=True, channel_id=fake.channel_of(guild))
            dm_user = USERS[-1]
            await fake.send_user_message(dm_user, "hello in private", dm=True)

            for guild in fake.guild_ids:
                opening, answer = await fake.wait_for_channel_messages(fake.channel_of(guild), 2)
                assert opening["content"] == TASK.opening_line
                assert answer["content"] == f"shard {fake.shard_of(guild, SHARDS)}"
            _, dm_answer = await fake.wait_for_channel_messages(fake.dm_channel_id(dm_user), 2)
            assert dm_answer["content"] == "shard 0"  # DMs belong to shard 0
            # Each message went to one replica only: one conversation per user, none answered twice.
            for guild in fake.guild_ids:
                assert len(fake.channel_messages[fake.channel_of(guild)]) == 2
            open_conversations = await sqlite_store.open_conversations()
            assert len(open_conversations) == len(fake.guild_ids) + 1
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*runners), 30)
            for service in services:
                await service.shutdown()
