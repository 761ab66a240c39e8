"""Data parallel under msrun on CPU: two workers end identical, and equal to one worker on the same batches;
the same two workers as two nodes end as under one msrun; SIGTERM to the workers stops both after the same
step, and the resumed run ends as one never stopped; so does a run resumed from its last periodic checkpoint
after a worker was SIGKILLed, and one that met an unreadable image on one rank (which saved), once the image
is replaced."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, last_json, make_image_folder, max_difference, read_ckpt, run_tool, tiny_config, tool_env
from mindcv_volo.engine.checkpoints import list_checkpoints
from mindcv_volo.engine.data import SplitInfo, epoch_order

pytestmark = [pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun is not installed"),
              pytest.mark.slow]  # whole training runs: the full suite only


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The per-sample augmentation is keyed by the sample's place in the global order, so it is the same on two
# workers as on one; drop path and MixToken draw per device (rank) and stay off where one is compared with two.
AUGMENTED = dict(epoch_size=2, clip_grad=True, clip_value=1.0, ema=True, ema_decay=0.9, num_parallel_workers=1,
                 auto_augment="randaug-m9-mstd0.5-inc1", re_prob=0.25, scale=[0.5, 1.0], hflip=0.5, log_interval=1)
STEPS = 6  # 48 images / (2 workers x 4)


def msrun(config, logs, *extra):
    return ["msrun", "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(free_port()), "--join",
            "True", "--log_dir", str(logs), os.path.join(ROOT, "train.py"), "-c", config, *extra]  # msrun runs python


def worker_logs(logs):
    return [(logs / f"worker_{rank}.log").read_text() for rank in range(2)]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """One uninterrupted 2-worker run of AUGMENTED; (folder, data, config, worker logs, its compile cache)."""
    root = tmp_path_factory.mktemp("msrun")
    data = make_image_folder(root / "data", {"train": 16, "val": 4})
    config = tiny_config(root / "two.yaml", data, root / "two", batch_size=4, **AUGMENTED)
    env = tool_env(root / "compile_cache")  # shared by the 2-worker runs of AUGMENTED
    proc = subprocess.run(msrun(config, root / "logs"), cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env)
    worker = worker_logs(root / "logs")
    assert proc.returncode == 0, proc.stdout[-2000:] + worker[0][-3000:] + worker[1][-3000:]
    return root, data, config, worker, env


def test_two_workers_match_one(two_workers):
    root, data, config, worker, _ = two_workers
    # Two workers with 4 images each per step. The stem's BatchNorm normalises each device's own batch,
    # so the single worker sees the same global batch of 8 as two accumulated micro-batches of 4.
    single = tiny_config(root / "one.yaml", data, root / "one", batch_size=4, gradient_accumulation_steps=2,
                         val_split="no_val", **AUGMENTED)  # no evaluation
    one = run_tool("train.py", "-c", single)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    # The ranks agree bit for bit (BatchNorm statistics included); rank 0 alone logs and saves.
    hashes = [re.search(rf"rank {rank} weights sha256 ([0-9a-f]{{16}})", worker[rank]).group(1) for rank in range(2)]
    assert hashes[0] == hashes[1]
    assert "epoch 2/2 done" in worker[0] and "epoch" not in worker[1]
    assert "2 workers" in worker[0]
    assert sorted(f for f in os.listdir(root / "two") if f.endswith(".ckpt")) == [
        f"volo_d1_224-1_{STEPS}.ckpt", f"volo_d1_224-2_{STEPS}.ckpt"]

    # One worker on the same global batches: same weights, EMA and optimizer moments. BatchNorm's running
    # statistics are excluded: the workers average theirs, one worker updates them batch after batch.
    final_two = read_ckpt(root / "two" / f"volo_d1_224-2_{STEPS}.ckpt")
    final_one = read_ckpt(root / "one" / f"volo_d1_224-2_{STEPS * 2}.ckpt")
    keep = [k for k in final_two if "moving_" not in k and not k.startswith("train_state.")]
    assert len(keep) > 250
    assert max_difference({k: final_two[k] for k in keep}, {k: final_one[k] for k in keep}) <= 1e-5

    # Evaluation is sharded and gathered: the whole val split, once; rank 0 prints the JSON line.
    # (MindSpore's cluster adds its own lines to the worker log after train.py's JSON line.)
    result = json.loads([line for line in worker[0].splitlines() if line.startswith("{")][-1])
    assert result["num_samples"] == 12 and 0 <= result["top1"] <= 1 and result["top5"] == 1.0
    assert not [line for line in worker[1].splitlines() if line.startswith("{")]
    # ... exactly the figures of one process validating the same weights (the EMA's, as train.py does)
    alone = run_tool("validate.py", "-c", config, "--ckpt_path", root / "two" / f"volo_d1_224-2_{STEPS}.ckpt",
                     "--ema", "True")
    assert alone.returncode == 0, alone.stderr[-3000:]
    expected = last_json(alone.stdout)
    assert [result[k] for k in ("top1", "top5", "loss", "num_samples")] == [
        expected[k] for k in ("top1", "top5", "loss", "num_samples")]


def cluster_by_hand(command, nodes, logs, env):
    """Run `command` as `msrun --worker_num N --local_worker_num 1 --master_addr <node 0> --node_rank i` does on
    each of N machines: a scheduler (MS_ROLE=MS_SCHED, on node 0) and worker i (MS_ROLE=MS_WORKER, MS_NODE_ID
    and RANK_ID i, DEVICE_ID 0: the first device of its machine), all given the scheduler's address. Two msrun
    launches cannot share one machine (each starts a scheduler when master_addr is local), so the test starts
    the processes as msrun would. Returns the exit codes: scheduler, then worker 0, 1, ..."""
    logs.mkdir()
    port = free_port()
    cluster = dict(env, MS_WORKER_NUM=str(nodes), RANK_SIZE=str(nodes), MS_SCHED_HOST="127.0.0.1",
                   MS_SCHED_PORT=str(port))
    roles = [("scheduler", dict(cluster, MS_ROLE="MS_SCHED"))] + [
        (f"worker_{node}", dict(cluster, MS_ROLE="MS_WORKER", MS_NODE_ID=str(node), RANK_ID=str(node), DEVICE_ID="0"))
        for node in range(nodes)]
    processes = []
    for name, role_env in roles:
        with open(logs / f"{name}.log", "w", encoding="utf-8") as log:
            processes.append(subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=role_env))
        if name == "scheduler":
            wait_for_port(port, processes[0])
    return [process.wait(timeout=900) for process in processes]


def wait_for_port(port, process, timeout=300):
    """Until the scheduler listens. Workers that reach the port before it did took 35-50 s here to join the
    cluster (MindSpore's reconnect), against 5-7 s when they start after."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None and time.time() < deadline, "the scheduler did not start listening"
            time.sleep(0.2)


def test_two_nodes_train_as_one_node_with_two_workers(two_workers, tmp_path):
    root, data, _, one_node, env = two_workers
    config = tiny_config(tmp_path / "two.yaml", data, tmp_path / "ckpt", batch_size=4, **AUGMENTED)
    codes = cluster_by_hand([sys.executable, os.path.join(ROOT, "train.py"), "-c", config], 2, tmp_path / "logs",
                            env)
    two_nodes = worker_logs(tmp_path / "logs")
    assert codes == [0, 0, 0], two_nodes[0][-3000:] + two_nodes[1][-3000:]
    assert "2 workers" in two_nodes[0] and "epoch 2/2 done" in two_nodes[0] and "epoch" not in two_nodes[1]
    # every rank ends with the weights it has under one msrun, bit for bit; rank 0 alone saved them
    for rank in range(2):
        pattern = rf"rank {rank} weights sha256 ([0-9a-f]{{16}})"
        assert re.search(pattern, two_nodes[rank]).group(1) == re.search(pattern, one_node[rank]).group(1)
    final = f"volo_d1_224-2_{STEPS}.ckpt"
    assert max_difference(read_ckpt(tmp_path / "ckpt" / final), read_ckpt(root / "two" / final)) == 0


def msrun_workers(msrun_pid):
    """The pids of msrun's training workers: its children running train.py with MS_ROLE=MS_WORKER (not the
    scheduler, not the log tails)."""
    children = open(f"/proc/{msrun_pid}/task/{msrun_pid}/children", encoding="ascii").read().split()
    workers = []
    for pid in map(int, children):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            command = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"MS_ROLE=MS_WORKER" in environ and b"train.py" in command:
            workers.append(pid)
    return workers


def test_sigterm_stops_every_worker_at_one_step_and_resumes_exactly(tmp_path, two_workers):
    """msrun itself answers Ctrl-C by killing its workers outright (SIGKILL): a graceful stop is a SIGTERM (or
    SIGINT) to the workers, as a cluster scheduler sends it. Both stop after the same step, rank 0 saves."""
    root, data, _, _, env = two_workers
    config = tiny_config(tmp_path / "two.yaml", data, tmp_path / "ckpt", batch_size=4, **AUGMENTED)
    logs = tmp_path / "logs"
    proc = subprocess.Popen(msrun(config, logs), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 600
    while "epoch 2/2 step 1/" not in ((logs / "worker_0.log").read_text() if (logs / "worker_0.log").exists()
                                      else ""):
        assert proc.poll() is None and time.time() < deadline, worker_logs(logs)[0][-3000:]
        time.sleep(0.2)
    workers = msrun_workers(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=600)
    assert proc.returncode != 0  # msrun reports workers that ended with an exit code of their own
    worker = worker_logs(logs)
    match = re.search(r"stopped by SIGTERM after epoch 2 step (\d+)/6: saved (\S+); to continue, add --resume True "
                      "to the msrun command", worker[0])
    assert match, worker[0][-3000:]
    step = int(match.group(1))
    assert f"rank 1: stopped by SIGTERM after epoch 2 step {step}/6, as every rank; rank 0 saved" in worker[1]
    saved = tmp_path / "ckpt" / f"volo_d1_224-2_{step}.ckpt"
    assert match.group(2) == str(saved)
    assert int(read_ckpt(saved)["train_state.epoch_step"]) == step

    resumed = subprocess.run(msrun(config, tmp_path / "logs2", "--resume", "True"), cwd=ROOT, capture_output=True,
                             text=True, timeout=900, env=env)
    worker = worker_logs(tmp_path / "logs2")
    assert resumed.returncode == 0, worker[0][-3000:] + worker[1][-3000:]
    assert f"epoch 2 at step {step}/6" in worker[0]
    final = f"volo_d1_224-2_{STEPS}.ckpt"
    assert max_difference(read_ckpt(tmp_path / "ckpt" / final), read_ckpt(root / "two" / final)) <= 1e-5


def resume_as_never_stopped(config, tmp_path, env, root, resumed_line):
    """`config`'s msrun run again with --resume True: rank 0 logs `resumed_line`, and the run ends with the final
    checkpoint of the run never stopped (`two_workers`, in `root`)."""
    resumed = subprocess.run(msrun(config, tmp_path / "logs2", "--resume", "True"), cwd=ROOT, capture_output=True,
                             text=True, timeout=900, env=env)
    worker = worker_logs(tmp_path / "logs2")
    assert resumed.returncode == 0, worker[0][-3000:] + worker[1][-3000:]
    assert resumed_line in worker[0]
    final = f"volo_d1_224-2_{STEPS}.ckpt"
    assert max_difference(read_ckpt(tmp_path / "ckpt" / final), read_ckpt(root / "two" / final)) <= 1e-5


def test_a_killed_worker_costs_only_the_steps_since_the_periodic_checkpoint(tmp_path, two_workers):
    """SIGKILL to one worker in the middle of epoch 2 (msrun then ends the other; nothing can be saved): the run
    resumed from the last checkpoint ckpt_every_steps wrote ends as the one never killed."""
    root, data, _, _, env = two_workers
    config = tiny_config(tmp_path / "two.yaml", data, tmp_path / "ckpt", batch_size=4, ckpt_every_steps=2,
                         **AUGMENTED)
    logs = tmp_path / "logs"
    proc = subprocess.Popen(msrun(config, logs), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    periodic = tmp_path / "ckpt" / "volo_d1_224-2_2.ckpt"  # after step 2 of epoch 2 (and 2, 4 of epoch 1)
    deadline = time.time() + 600
    while not periodic.exists():
        assert proc.poll() is None and time.time() < deadline, worker_logs(logs)[0][-3000:]
        time.sleep(0.05)
    workers = msrun_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    proc.wait(timeout=600)
    assert proc.returncode != 0
    assert not [line for log in worker_logs(logs) for line in log.splitlines() if "stopped by" in line]
    epoch, step, latest = list_checkpoints(str(tmp_path / "ckpt"), "volo_d1_224")[-1]
    assert epoch == 2 and step in (2, 4), latest  # a periodic checkpoint, mid-epoch

    resume_as_never_stopped(config, tmp_path, env, root,
                            f"resumed from {latest}: 1 of 2 epochs done, epoch 2 at step {step}/{STEPS}")


def test_an_unreadable_image_on_one_rank_saves_there_and_resumes_exactly(tmp_path, two_workers):
    """Rank 1 meets the image at step 4 of epoch 1: it writes the checkpoint after step 3 (every rank holds that
    state; rank 0 waits in step 4's all-reduce until msrun ends it)."""
    root, data, _, _, env = two_workers
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    split = SplitInfo(str(broken), "train")
    # global batch 8: rank 1 reads places 4-7 of each; step 4 (from 1) is places 24-31; seed 7: tiny_config's
    bad = os.path.join(split.folder, split.items[epoch_order(split.count, 8, STEPS, 7, 0)[3 * 8 + 5]][0])
    original = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(b"not an image")
    config = tiny_config(tmp_path / "two.yaml", broken, tmp_path / "ckpt", batch_size=4, **AUGMENTED)
    stopped = subprocess.run(msrun(config, tmp_path / "logs"), cwd=ROOT, capture_output=True, text=True,
                             timeout=900, env=env)
    worker = worker_logs(tmp_path / "logs")
    assert stopped.returncode != 0
    saved = tmp_path / "ckpt" / "volo_d1_224-1_3.ckpt"
    assert (f"error: cannot read image {bad}: corrupt or not an image; remove or replace it; saved {saved} after "
            f"epoch 1 step 3/{STEPS}; to continue, add --resume True to the msrun command") in worker[1]
    assert "Traceback" not in worker[1] and int(read_ckpt(saved)["train_state.epoch_step"]) == 3

    with open(bad, "wb") as f:
        f.write(original)
    resume_as_never_stopped(config, tmp_path, env, root,
                            f"resumed from {saved}: 0 of 2 epochs done, epoch 1 at step 3/{STEPS}")
