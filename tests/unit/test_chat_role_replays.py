"""Public reports on chat templates that refuse a conversation (Gemma's "System role not
supported", Mistral's "roles must alternate"), replayed through the gateway's shaping with a
template of that kind and the tiny model's tokenizer, no servers: a 400 naming messages with the
template's own reason (SGLang answered 500), and vLLM's ``add_generation_prompt: false`` honoured."""

from __future__ import annotations

from pathlib import Path

from dlora.services.gateway.served_model import ServedModel
from tests.unit.test_chat_template import llama_style_tokenizer
from tests.unit.test_gateway_shaping import refused, shape

# Gemma's template's checks (google/gemma-2b-it's tokenizer_config.json): no system role, and
# user and model turns in turn.
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] + '<end>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<turn>model\n' }}{% endif %}"
)


def test_a_template_that_refuses_the_roles_is_a_400_in_its_words(tiny_llama, tmp_path: Path) -> None:
    """vLLM #2964 (Gemma's "System role not supported", a 400 at vLLM), SGLang #892 (the same
    request a 500 there) and vLLM #2080 (Mistral's "Conversation roles must alternate" for a
    system message): a 400 naming messages with the template's reason; the conversation it takes
    is served, and ``add_generation_prompt: false`` leaves the model's turn unopened."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = GEMMA_STYLE
    model = ServedModel(tok, 1 << 16, 1024)
    system = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}]
    e = refused(model, {"messages": system}, chat=True)
    assert (e.status, e.param) == (400, "messages") and e.message.endswith("System role not supported"), e.message
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    e = refused(model, {"messages": twice}, chat=True)
    assert e.param == "messages" and "roles must alternate" in e.message, e.message
    user = [{"role": "user", "content": "Hello"}]
    for generation, end in ((None, "<turn>model\n"), (False, "Hello<end>\n")):
        job = shape(model, {"messages": user, "add_generation_prompt": generation}, chat=True)
        request = job.choices[0].request
        assert request is not None and tok.decode(request.prompt_token_ids).endswith(end)
