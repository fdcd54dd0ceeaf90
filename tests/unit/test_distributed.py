"""When `main` initialises jax.distributed, and with which arguments (no process started)."""
from __future__ import annotations

import pytest

from deepintuit_jax.core import distributed
from deepintuit_jax.core.errors import ConfigError


def test_explicit_coordinator_passes_count_and_index():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.init_args(env) == dict(coordinator_address="10.0.0.1:1234",
                                            num_processes=4, process_id=3)


@pytest.mark.parametrize("env", [
    {"SLURM_NTASKS": "8", "SLURM_PROCID": "2"},
    {"OMPI_COMM_WORLD_SIZE": "2"},
    {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"},
])
def test_cluster_environments_use_auto_detection(env):
  assert distributed.init_args(env) == {}


@pytest.mark.parametrize("env", [
    {}, {"SLURM_NTASKS": "1"}, {"OMPI_COMM_WORLD_SIZE": "1"}, {"TPU_WORKER_HOSTNAMES": "t0"},
    {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
])
def test_single_process_is_left_alone(env):
  assert distributed.init_args(env) is None


@pytest.mark.parametrize("env,names", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["JAX_COORDINATOR_ADDRESS"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     ["JAX_PROCESS_ID=2"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     ["JAX_NUM_PROCESSES='two'"]),
])
def test_bad_explicit_settings_name_the_variable(env, names):
  with pytest.raises(ConfigError) as e:
    distributed.init_args(env)
  for n in names:
    assert n in str(e.value)
