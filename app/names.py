"""Readable, unique run names such as `swift_running_falcon`."""

import secrets

ADJECTIVES = (
    "swift", "calm", "bright", "bold", "brave", "clever", "eager", "gentle", "happy", "keen",
    "lively", "lucky", "mellow", "nimble", "proud", "quiet", "rapid", "silent", "steady",
    "sunny", "tidy", "vivid", "wise", "witty", "zesty", "amber", "azure", "crimson", "golden",
    "silver", "misty", "frosty", "dusty", "royal", "noble", "humble", "jolly", "merry", "plucky",
)
VERBS = (
    "running", "flying", "jumping", "dancing", "singing", "diving", "gliding", "climbing",
    "racing", "soaring", "drifting", "roaming", "dashing", "leaping", "sailing", "hopping",
    "swimming", "wandering", "hunting", "dreaming", "floating", "skating", "spinning",
    "sprinting", "thinking", "humming", "glowing", "rolling", "rising", "shining",
)
ANIMALS = (
    "falcon", "otter", "badger", "heron", "lynx", "panda", "tiger", "walrus", "yak", "zebra",
    "beaver", "bison", "crane", "dolphin", "eagle", "ferret", "gecko", "ibis", "jaguar",
    "koala", "lemur", "marmot", "narwhal", "ocelot", "puffin", "quokka", "raven", "salmon",
    "toucan", "urchin", "vulture", "wombat", "alpaca", "cobra", "dingo", "egret", "finch",
)


def new_run_name(attempt: int = 0) -> str:
    """Return a random name; after a few collisions a random suffix keeps it unique."""
    name = "_".join(secrets.choice(words) for words in (ADJECTIVES, VERBS, ANIMALS))
    if attempt >= 3:
        name += f"_{secrets.token_hex(3)}"
    return name
