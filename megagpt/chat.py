"""Talking to a fine-tuned model: the chat template applied turn by turn.

A `ChatSession` keeps the ids of the whole conversation and their KV cache, so a turn
costs only its own tokens: the user's message, written as the template writes a user
turn, and the reply. The ids are those fine-tuning saw: each turn's prefix, content and
end, and the generation prompt; a reply stops at the template's turn end (or EOD),
and the turn is then closed with the end exactly as the template writes it.

When the conversation outgrows the model's context, the oldest turns are dropped and
what is left re-encoded (the system prompt is kept); the session says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from megagpt.checkpoint import load_model_for_inference
from megagpt.errors import MegagptError
from megagpt.generate import (
    Sampling,
    TextStream,
    cached_length,
    new_cache,
    rewind_cache,
    stream_tokens,
)
from megagpt.model.gpt import GPT
from megagpt.tokenizer import ChatTemplate, Tokenizer, load_chat_template

log = logging.getLogger(__name__)


class ChatError(MegagptError):
    """A chat that cannot go on as asked: no template, or a message that cannot fit."""


class ChatSession:
    """One conversation with a model, its KV cache kept from turn to turn.

    Args:
        model: The model, in eval mode.
        tokenizer: The tokenizer it was trained with.
        template: The chat template its fine-tuning data was rendered with.
        sampling: How each reply token is chosen; a seed seeds the whole session.
        max_new_tokens: The most tokens one reply may have.
        system: A system prompt that starts the conversation, or None.
        notify: Called with a line the user should read (turns dropped, a reply cut).

    Raises:
        TemplateError: The tokenizer cannot spell the template's markers.
        ChatError: The system prompt holds a marker, or leaves no room for a turn.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        sampling: Sampling | None = None,
        max_new_tokens: int = 256,
        system: str | None = None,
        notify: Callable[[str], None] = log.warning,
    ):
        template.check(tokenizer)
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.sampling = sampling or Sampling()
        self.max_new_tokens = max_new_tokens
        self.notify = notify
        self.system = None if system is None else self._checked("system prompt", system)
        self.stop_ids = self._stop_ids()
        self.cache = new_cache(model)
        self.generator = self.sampling.generator(next(model.parameters()).device)
        self.interrupted = False
        """Whether the last reply was stopped by Ctrl-C."""
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (the system prompt and the sampling generator stay)."""
        self.messages: list[dict[str, str]] = []
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})
        self.ids: list[int] = []
        """The conversation as the model has read it (the cache holds a prefix)."""
        rewind_cache(self.cache, 0)

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Append a user turn and generate the assistant's reply.

        The reply stops at the template's turn end or EOD, after `max_new_tokens`, or on
        Ctrl-C (KeyboardInterrupt, also when `on_text` raises it): what was generated
        stays, `interrupted` says so, and the turn is closed either way.

        Args:
            user_text: The user's message.
            on_text: Called once per generated token with the text it adds ("" while a
                character is incomplete), for printing the reply as it comes; once more
                at the end if a rest was held back.

        Returns:
            The reply's text, without the turn end.

        Raises:
            ChatError: The message holds a template marker, or does not fit in
                model.max_seq_len even with every earlier turn dropped.
        """
        user = {"role": "user", "content": self._checked("message", user_text)}
        saved = (list(self.messages), list(self.ids))
        self.messages.append(user)
        if self.ids:
            self.ids += self._continue(user)
        else:
            self.ids = self._prompt(self.messages)
        if len(self.ids) >= self.model.config.max_seq_len and not self._make_room([]):
            system = self.messages[:1] if self.system is not None else []
            alone = len(self._prompt([*system, user]))
            self.messages, self.ids = saved
            raise ChatError(
                f"the message makes a prompt of {alone} tokens; the model takes at "
                f"most {self.model.config.max_seq_len} (model.max_seq_len), reply included: "
                "shorten it" + (" or the system prompt (--system)" if self.system else "")
            )
        reply_ids = self._generate(on_text)
        text = self.tokenizer.decode(reply_ids)
        end = self.template.end("assistant")
        closed = bool(end) and text.endswith(end)  # e.g. plain's "\n", generated before EOD
        if end and not closed:
            self.ids += self.tokenizer.encode_continuation(end)
        content = text[: -len(end)] if closed else text
        self.messages.append({"role": "assistant", "content": content})
        return content

    @torch.no_grad()
    def next_token_logits(self) -> torch.Tensor:
        """Logits (V,) of the token after the conversation so far, from the kept cache
        (feeding it the ids it does not hold yet); for checking the cache."""
        start = min(cached_length(self.cache), len(self.ids) - 1)
        rewind_cache(self.cache, start)
        fresh = torch.tensor([self.ids[start:]], device=next(self.model.parameters()).device)
        logits = self.model(fresh, start_pos=start, kv_cache=self.cache)
        return logits[0, -1, : self.model.config.vocab_size]

    def _generate(self, on_text: Callable[[str], None] | None) -> list[int]:
        reply_ids: list[int] = []
        text = TextStream(self.tokenizer)
        self.interrupted = stopped = False
        try:
            while not stopped and len(reply_ids) < self.max_new_tokens:
                full = len(self.ids) >= self.model.config.max_seq_len
                if full and not self._make_room(reply_ids):
                    self.notify(
                        f"the reply is cut at {len(reply_ids)} tokens: it fills the model's "
                        f"context (model.max_seq_len = {self.model.config.max_seq_len})"
                    )
                    break
                for token in stream_tokens(
                    self.model,
                    self.ids,
                    self.max_new_tokens - len(reply_ids),
                    self.sampling,
                    self.stop_ids,
                    self.cache,
                    self.generator,
                ):
                    if token in self.stop_ids:
                        stopped = True
                        break
                    self.ids.append(token)
                    reply_ids.append(token)
                    if on_text is not None:
                        on_text(text.push(token))
            rest = text.flush()
            if rest and on_text is not None:
                on_text(rest)
        except KeyboardInterrupt:
            self.interrupted = True  # the cache may be a step ahead; stream_tokens rewinds
        return reply_ids

    def _make_room(self, reply_ids: list[int]) -> bool:
        """Drop the fewest oldest turns (a user turn and the replies after it; the system
        prompt stays) that leave room for a token, re-encoding the rest with the reply so
        far; False, with nothing changed, when only the current turn would be left."""
        first = 1 if self.system is not None else 0
        for start, message in enumerate(self.messages):
            if start <= first or message["role"] != "user":
                continue
            kept = self.messages[:first] + self.messages[start:]
            ids = self._prompt(kept) + reply_ids
            if len(ids) < self.model.config.max_seq_len:
                self.notify(
                    f"the conversation fills the model's context (model.max_seq_len = "
                    f"{self.model.config.max_seq_len}): dropped its oldest "
                    f"{len(self.messages) - len(kept)} message(s)"
                )
                self.messages, self.ids = kept, ids
                rewind_cache(self.cache, 0)
                return True
        return False

    def _prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids of a whole conversation and the generation prompt, as a fine-tuning
        example starts: at position 0 with its first turn (see render_prompt)."""
        return self.template.render_prompt(self.tokenizer, messages)

    def _continue(self, message: dict[str, str]) -> list[int]:
        """The ids of one more turn and the generation prompt, each segment tokenized as
        `ChatTemplate.render_prompt` tokenizes every segment after the first."""
        role, content = message["role"], message["content"]
        segments = (self.template.prefix(role), content, self.template.end(role))
        ids = []
        for segment in (*segments, self.template.generation_prompt):
            if segment:
                ids += self.tokenizer.encode_continuation(segment)
        return ids

    def _checked(self, what: str, text: str) -> str:
        for marker in self.template.markers:
            if marker in text:
                raise ChatError(
                    f"the {what} contains {marker}, which the chat template "
                    f"{self.template.full_name} uses to mark turns: leave it out"
                )
        return text

    def _stop_ids(self) -> set[int]:
        """EOD and every marker that is one token: the turn end, and any marker that
        would start a turn the model should not write (a reply holding one could not
        be rendered again)."""
        stops = {self.tokenizer.eod_id}
        for marker in self.template.markers:
            ids = self.tokenizer.encode_continuation(marker)
            if len(ids) == 1:
                stops.add(ids[0])
        return stops


def load_chat_session(
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    template: str | None = None,
    **session_options,
) -> ChatSession:
    """A `ChatSession` with a checkpoint's model, tokenizer and chat template.

    Args:
        checkpoint: A checkpoint directory, checkpoints/ root, or a run's output_dir.
        device: Where the model runs.
        template: A template name or JSON file to use instead of the checkpoint's.
        **session_options: The rest of `ChatSession`'s arguments.

    Raises:
        ChatError: The checkpoint has no tokenizer, or no chat template and none is given.
    """
    model, config, _ = load_model_for_inference(checkpoint, device)
    if not config.data.tokenizer:
        raise ChatError(
            f"{checkpoint} names no tokenizer (data.tokenizer) and holds no copy of one "
            "(tokenizer.model or tokenizer.json): a chat needs the tokenizer the model was "
            "trained with"
        )
    spec = template or config.data.chat_template
    if not spec:
        raise ChatError(
            f"{checkpoint} has no chat template (chat_template.json): it was not "
            "fine-tuned on chat data. Continue text with megagpt generate --checkpoint "
            f"{checkpoint} --prompt TEXT, or apply the plain template anyway with "
            "--template plain"
        )
    tokenizer = Tokenizer(config.data.tokenizer)
    return ChatSession(model, tokenizer, load_chat_template(spec), **session_options)
