# Copyright the OpenRLHF authors (https://github.com/OpenRLHF/OpenRLHF).
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance
# with the License. You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is
# distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and limitations under the License.
#
# Source: https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/datasets/prompts_dataset.py
# (OpenRLHF main at commit 3c3be6234e0cb353e76bb8019947db9dfe99fca7). Lines 1 and 7-45 of the file,
# unmodified: `import copy` and the two functions that turn a dataset row into the prompt text the policy is given
# (the chat template applied with add_generation_prompt=True). Left out: `from torch.utils.data import Dataset`,
# `from tqdm import tqdm` and `class PromptDataset` (lines 3-4 and 48-), which needs OpenRLHF's training strategy.

import copy


def _str_to_content_list(text: str):
    """Convert a string with ``<image>`` tags to a VLM content list.

    E.g. ``"<image>Find x."`` → ``[{"type": "image"}, {"type": "text", "text": "Find x."}]``
    Returns the original string unchanged when no ``<image>`` tags are present.
    """
    if "<image>" not in text:
        return text
    parts = text.split("<image>")
    content = []
    for i, part in enumerate(parts):
        if i > 0:
            content.append({"type": "image"})
        stripped = part.strip()
        if stripped:
            content.append({"type": "text", "text": stripped})
    return content


def preprocess_data(data, input_template=None, input_key="input", label_key=None, apply_chat_template=None) -> str:
    if apply_chat_template:
        chat = data[input_key]
        if isinstance(chat, str):
            chat = [{"role": "user", "content": _str_to_content_list(chat)}]
        elif isinstance(chat, list):
            # Deep copy to avoid mutating the original dataset entries.
            chat = copy.deepcopy(chat)
            for msg in chat:
                if isinstance(msg.get("content"), str):
                    msg["content"] = _str_to_content_list(msg["content"])
        prompt = apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    else:
        prompt = data[input_key]
        if input_template:
            prompt = input_template.format(prompt)

    # for Reinforced Fine-tuning
    label = "" if label_key is None else data[label_key]
    return prompt, label
