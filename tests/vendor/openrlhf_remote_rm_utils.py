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
# Source: https://github.com/OpenRLHF/OpenRLHF/blob/06ab51e75c0e8c5b4d6b66912996b2a611e3dc2f/openrlhf/utils/remote_rm_utils.py
# (tag v0.9.0, commit 06ab51e75c0e8c5b4d6b66912996b2a611e3dc2f: the last release with this
# file; main removed it on 2026-01-05 in 6298708, identical to it there). The whole file, unmodified but for the two
# imports marked VENDORED below. request_api_wrapper is the requests client OpenRLHF up to 0.9.0 POSTed
# `--remote_rm_url` with; its PPO experience maker called RemoteRewardModel.get_rewards (sharding the batch across
# the URLs) through ray.

import time
# VENDORED: the one changed line; it read `import ray`. An in-process stand-in (tests/vendor/ray_standin.py)
# for the ray.remote / .remote() / ray.get calls below, so no ray cluster is needed.
from . import ray_standin as ray
import requests

# VENDORED: changed as in openrlhf_agent.py (openrlhf.utils imports deepspeed).
from logging import getLogger as init_logger

logger = init_logger(__name__)


def request_api_wrapper(url, data, try_max_times=5):
    """Synchronous request API wrapper"""
    headers = {
        "Content-Type": "application/json",
    }
    for _ in range(try_max_times):
        try:
            response = requests.post(url=url, json=data, headers=headers, timeout=180)
            response.raise_for_status()  # Raise an HTTPError for bad responses
            response = response.json()
            return response
        except requests.RequestException as e:
            logger.info(f"Request error, please check: {e}")
        except Exception as e:
            logger.info(f"Unexpected error, please check: {e}")
        time.sleep(1)

    raise Exception(f"Request error for {try_max_times} times, returning None. Please check the API server.")


@ray.remote
def remote_rm_fn_ray(api_url, queries, prompts, labels):
    return request_api_wrapper(api_url, {"query": queries, "prompts": prompts, "labels": labels})


@ray.remote
class RemoteRewardModel:
    def __init__(self, args, remote_rm_url):
        self.args = args
        self.remote_rm_url = [remote_rm_url] if isinstance(remote_rm_url, str) else remote_rm_url
        self.custom_reward_func = None

        if self.remote_rm_url and self.remote_rm_url[0].endswith(".py"):
            print(f"Loading custom `reward_func(queries, prompts, labels)` from {self.remote_rm_url[0]}")
            import importlib.util

            spec = importlib.util.spec_from_file_location("reward_func", self.remote_rm_url[0])
            reward_module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(reward_module)
            self.custom_reward_func = ray.remote(reward_module.reward_func)

    def get_rewards(self, queries_list, prompts_list, labels_list):
        if self.custom_reward_func:
            # Let Ray automatically distribute the workload across available resources
            batch_size = self.args.micro_rollout_batch_size
            num_chunks = (len(queries_list) + batch_size - 1) // batch_size
            r_refs = []
            for i in range(num_chunks):
                start_idx = i * batch_size
                end_idx = min((i + 1) * batch_size, len(queries_list))
                r = self.custom_reward_func.remote(
                    queries_list[start_idx:end_idx],
                    prompts_list[start_idx:end_idx],
                    labels_list[start_idx:end_idx],
                )
                r_refs.append(r)
        else:
            # Distribute data across different remote reward function servers
            num_servers = len(self.remote_rm_url)
            batch_size = (len(queries_list) + num_servers - 1) // num_servers
            r_refs = []
            for i in range(num_servers):
                start_idx = i * batch_size
                end_idx = min((i + 1) * batch_size, len(queries_list))
                rm = self.remote_rm_url[i]
                r = remote_rm_fn_ray.remote(
                    rm,
                    queries=queries_list[start_idx:end_idx],
                    prompts=prompts_list[start_idx:end_idx],
                    labels=labels_list[start_idx:end_idx],
                )
                r_refs.append(r)

        return ray.get(r_refs)
