"""The generic lines a compiled world falls back on when a task file details nothing: how users answer, open,
hedge and react, how agents ask and act. ``{dimension}``/``{value}`` are filled per dimension and value.

Every list is split by :func:`imagine.world.splits.split_items` into phrasings for training and phrasings held out
for evaluation, so a policy is always tested on wording it never saw.
"""

from __future__ import annotations

#: How a user gives a value when the task file has no ``says`` for it.
ANSWER_TEMPLATES: tuple[str, ...] = (
    "{Value}.",
    "I'd say {value}.",
    "{Value}, I think.",
    "Definitely {value}.",
    "For the {dimension}: {value}.",
    "Probably {value}.",
    "Hmm, {value}.",
    "It's {value} for me.",
)

#: A user who has no preference for a dimension ("you pick"); the reader recognises ``don't mind the <dimension>``.
FLEXIBLE_REPLIES: tuple[str, ...] = (
    "I don't mind the {dimension}, you pick.",
    "Honestly I don't mind the {dimension}. Your call.",
    "I don't mind the {dimension} at all.",
)

#: A user who has not made up their mind yet (asked again, they answer).
VAGUE_REPLIES: tuple[str, ...] = (
    "Hmm, hard to say about the {dimension} yet.",
    "I haven't really thought about the {dimension}.",
    "Let me think about the {dimension}...",
)

#: Prefixes for an answer the user already gave (the agent asked again).
REPEAT_PREFIXES: tuple[str, ...] = ("As I said, ", "Like I mentioned, ", "Again, ")

#: A user's first reply to an opening line that asks nothing in particular.
USER_OPENINGS: tuple[str, ...] = (
    "Hi! I could use some help.",
    "Hello. I'm not sure where to start.",
    "Hi there, I'd like a suggestion.",
    "Hey! Can you help me out?",
    "Hello, I'm looking for some advice.",
    "Hi, thanks. Where do we begin?",
)

CONFUSED_REPLIES: tuple[str, ...] = (
    "Sorry, I'm not sure what you mean.",
    "Hmm, can you ask that differently?",
    "I don't follow. What do you need to know?",
)
SUCCESS_REPLIES: tuple[str, ...] = (
    "That sounds perfect, thank you!",
    "Great, that's exactly right for me.",
    "Yes! I love it.",
)
FAILURE_REPLIES: tuple[str, ...] = (
    "Hmm, that's not really for me.",
    "No thanks, that doesn't suit me.",
    "I don't think that fits what I told you.",
)
HEDGE_REPLIES: tuple[str, ...] = (
    "That's too many options. I wanted one clear suggestion.",
    "Please just pick one for me.",
)
TIMEOUT_REPLIES: tuple[str, ...] = ("I have to go now. Thanks anyway.", "I'll look elsewhere, bye.")
#: Said when the agent went on without answering the user's side question (that turn answers nothing else).
UNANSWERED_SIDE_PREFIXES: tuple[str, ...] = ("You didn't answer me: ", "Sorry, but first: ", "Wait, ")

#: How an agent asks about a dimension when the task file gives no questions.
QUESTION_TEMPLATES: tuple[str, ...] = (
    "What {dimension} do you have in mind?",
    "Could you tell me about your {dimension}?",
    "Which {dimension} suits you: {values}?",
    "What about the {dimension}?",
)

#: A short acknowledgement some scripted agents put before their next question.
ACKNOWLEDGEMENTS: tuple[str, ...] = ("", "", "Great! ", "Got it. ", "Thanks. ", "Nice. ")

#: How a scripted agent commits when the task file gives no ``act_templates``.
ACT_TEMPLATES: tuple[str, ...] = (
    "I recommend {main}: {rest}.",
    "How about {main}? It's {rest}.",
    "My suggestion is {main}, {rest}.",
    "You should go for {main}: {rest}.",
)

#: Words with which an agent commits even when it names nothing the world knows (judged a misfit, not ignored).
ACT_MARKERS: tuple[str, ...] = ("i recommend", "i suggest", "i'd suggest", "how about", "you should", "my suggestion")

#: What every good answer to a side question may start with; a reply with one counts as answering it.
SIDE_ACKNOWLEDGEMENTS: tuple[str, ...] = ("good question", "great question", "to answer your question")

#: Side questions for a task file that lists none: (question, brief answer).
SIDE_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("How long will this take?", "Only a couple of quick questions."),
    ("Are you a bot?", "I'm an automated assistant, happy to help."),
    ("Can I change my mind later?", "Of course, you can always change your mind."),
    ("Is this free?", "Yes, asking me costs nothing."),
    ("Do many people ask you this?", "Yes, it's a common question."),
    ("Will you remember what I told you?", "Yes, I'll keep it in mind while we talk."),
)

#: Words too common to mark a question about a dimension by themselves.
STOPWORDS: frozenset[str] = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "do",
        "does",
        "for",
        "from",
        "how",
        "in",
        "is",
        "it",
        "its",
        "main",
        "much",
        "of",
        "on",
        "or",
        "prefer",
        "preferred",
        "the",
        "their",
        "them",
        "they",
        "this",
        "to",
        "what",
        "which",
        "who",
        "whose",
        "with",
        "you",
        "your",
    ]
)
