"""Tokenizer, chat template, prompt and processor of the bundled model.

The tokenizer is a small byte-level BPE trained on the normalized training transcripts (plus the instruction), so
any text can be encoded while the frequent words of transcripts become one or two tokens. The chat template renders
an audio item as ``<|audio_bos|><|AUDIO|><|audio_eos|>`` and a text item verbatim, which makes the chat prompt
identical to Qwen2-Audio base's raw ASR prompt.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
AUDIO = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
LANG_EN = "<|en|>"
SPECIAL_TOKENS = [EOS, PAD, AUDIO, AUDIO_BOS, AUDIO_EOS, LANG_EN]

ASR_INSTRUCTION = "Detect the language and recognize the speech: "
ASR_TEXT = ASR_INSTRUCTION + LANG_EN
ASR_PROMPT = AUDIO_BOS + AUDIO + AUDIO_EOS + ASR_TEXT

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' or 'audio' in item or 'audio_url' in item -%}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_tokenizer(tok: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=[AUDIO, AUDIO_BOS, AUDIO_EOS, LANG_EN],
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_processor(tok: Tokenizer):
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    return Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
        tokenizer=hf_tokenizer(tok),
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    tok.save(str(path))
