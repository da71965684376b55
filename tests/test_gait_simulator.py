import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from utils import gait_simulator as sim
from utils.data_loader import scan_dataset

RADAR = sim.RadarConfig(prf_hz=2000.0)  # fine time steps for numerical derivatives
AVERAGE_PERSON = sim.user_person(seed=0, user_number=1, identity_strength=0.0)


def quiet_walk(aspect_deg=0.0, speed=1.3, distance=9.0):
    jitter = {joint: 1.0 for joint in ("hip", "knee", "ankle", "elbow", "arm")}
    return sim.Walk(speed, 0.0, aspect_deg, distance, snr_db=30.0, clutter_db=-30.0, swing_jitter=jitter)


def doppler_by_segment(walk, person=AVERAGE_PERSON, cycles=2):
    """Doppler (Hz) of every segment over whole gait cycles: f = -2/lambda dR/dt."""
    cycle_s, _ = sim.gait_timing(walk.speed_mps / person.leg_length_m)
    t = np.arange(0.0, cycles * cycle_s, 1.0 / RADAR.prf_hz)
    _, ranges = sim.segment_returns(person, walk, RADAR, t)
    doppler = -2.0 / RADAR.wavelength_m * np.gradient(ranges, t, axis=1)
    return {name: d for (name, *_), d in zip(sim.SEGMENTS, doppler)}


def test_mean_torso_doppler_is_two_v_over_lambda():
    for speed in (1.0, 1.3, 1.6):
        doppler = doppler_by_segment(quiet_walk(speed=speed))
        # The radar sits 1 m high, 9 m away: the line of sight is within 1 degree of level.
        assert doppler["torso"].mean() == pytest.approx(2 * speed / RADAR.wavelength_m, rel=0.01)


def test_limb_peaks_exceed_the_torso():
    doppler = doppler_by_segment(quiet_walk())
    torso_peak = doppler["torso"].max()
    for limb in ("right_foot", "left_foot", "right_lower_leg", "left_lower_arm"):
        assert doppler[limb].max() > 1.2 * torso_peak, limb
    # Feet stop on the ground: their Doppler falls to about zero once a cycle.
    assert doppler["right_foot"].min() < 0.1 * doppler["torso"].mean()


def test_gait_period_matches_boulic_formula():
    for speed in (1.0, 1.5):
        walk = quiet_walk(speed=speed)
        rv = speed / AVERAGE_PERSON.leg_length_m
        expected = 1.346 * np.sqrt(rv) / rv
        foot = doppler_by_segment(walk, cycles=6)["right_foot"]
        foot = foot - foot.mean()
        autocorrelation = np.correlate(foot, foot, mode="full")[len(foot) - 1:]
        lags = np.arange(len(foot)) / RADAR.prf_hz
        search = (lags > 0.3) & (lags < 3.0)
        measured = lags[search][np.argmax(autocorrelation[search])]
        assert measured == pytest.approx(expected, rel=0.02)


def test_walking_away_flips_the_doppler_sign():
    toward = doppler_by_segment(quiet_walk(aspect_deg=0.0))["torso"].mean()
    away = doppler_by_segment(quiet_walk(aspect_deg=180.0, distance=3.0))["torso"].mean()
    assert toward > 0 > away
    assert away == pytest.approx(-toward, rel=0.02)


def test_feet_do_not_alias_at_the_default_prf():
    fastest = sim.Person(**{**sim.asdict(AVERAGE_PERSON), "height_m": 1.5})
    doppler = doppler_by_segment(quiet_walk(speed=1.7 * 1.2), person=fastest)
    peak = max(np.abs(d).max() for d in doppler.values())
    assert peak < sim.RadarConfig().prf_hz / 2


def test_ellipsoid_rcs_known_answers():
    r = 0.3
    for theta, phi in [(0.0, 0.0), (0.7, 0.2), (np.pi / 2, 1.0)]:
        assert sim.ellipsoid_rcs(r, r, r, theta, phi) == pytest.approx(np.pi * r**2)  # a sphere
    a, b, c = 0.1, 0.2, 0.5
    assert sim.ellipsoid_rcs(a, b, c, 0.0, 0.0) == pytest.approx(np.pi * a**2 * b**2 / c**2)  # along c
    assert sim.ellipsoid_rcs(a, b, c, np.pi / 2, 0.0) == pytest.approx(np.pi * b**2 * c**2 / a**2)  # along a


def test_approaching_energy_is_above_the_centre_line():
    radar = sim.RadarConfig()
    t = np.arange(int(radar.duration_s * radar.prf_hz)) / radar.prf_hz
    body = sim.segment_returns(AVERAGE_PERSON, quiet_walk(), radar, t)[0].sum(axis=0)
    power = 10 ** (sim.spectrogram_db(body, radar) / 10)
    rows = np.arange(power.shape[0])[:, None]
    centroid = (power * rows).sum() / power.sum()
    assert centroid < power.shape[0] / 2 - 5  # row 0 is the top: +prf/2


def test_identity_depends_on_seed_and_user_only():
    assert sim.user_person(0, 5) == sim.user_person(0, 5)
    assert sim.user_person(0, 5) != sim.user_person(0, 6)
    assert sim.user_person(0, 5) != sim.user_person(1, 5)
    assert sim.user_person(0, 5, identity_strength=0.0) == sim.user_person(0, 6, identity_strength=0.0)


def simulate(out, *extra, users=2, images=2, resolution=32):
    return run_cli(
        "-m", "utils.gait_simulator", "--output_dir", out, "--num_users", users,
        "--images_per_user", images, "--resolution", resolution, "--seed", 3, *extra,
    )


def test_layout_card_and_loader(tmp_path):
    result = simulate(tmp_path / "sim", users=3, images=2, resolution=48)
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout
    folders = sorted(p.name for p in (tmp_path / "sim").iterdir())
    assert folders == ["ID_1", "ID_2", "ID_3", "dataset_card.json"]
    image = Image.open(tmp_path / "sim" / "ID_2" / "ID_2_0001.png")
    assert image.size == (48, 48) and image.mode == "RGB"
    card = json.loads((tmp_path / "sim" / "dataset_card.json").read_text())
    assert card["seed"] == 3 and card["simulator_version"] == sim.SIMULATOR_VERSION
    assert card["radar"]["carrier_hz"] == 5.8e9 and card["radar"]["prf_hz"] == 560.0
    assert card["users"][1]["person"] == sim.asdict(sim.user_person(3, 2))
    assert set(card["users"][1]["images"]) == {"ID_2_0000.png", "ID_2_0001.png"}
    scan = scan_dataset(tmp_path / "sim")
    assert list(scan.files) == ["ID_1", "ID_2", "ID_3"] and not scan.unreadable


def test_recordings_are_consecutive_overlapping_windows(tmp_path):
    result = simulate(tmp_path / "sim", "--windows_per_recording", 4, users=2, images=10, resolution=64)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "sim" / "ID_1").iterdir())
    assert names == [f"ID_1_rec{r:03d}_{w:03d}.png" for r, w in ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
                                                                (1, 3), (2, 0), (2, 1))]
    card = json.loads((tmp_path / "sim" / "dataset_card.json").read_text())
    assert card["windows_per_recording"] == 4 and "near-copies" in card["recordings"]
    images = card["users"][0]["images"]
    assert images["ID_1_rec001_002.png"]["recording"] == "rec001"
    assert images["ID_1_rec001_000.png"] == images["ID_1_rec001_003.png"]  # one walk
    assert images["ID_1_rec001_000.png"]["speed_mps"] != images["ID_1_rec002_000.png"]["speed_mps"]

    def grey(name):
        return np.asarray(Image.open(tmp_path / "sim" / "ID_1" / name).convert("L"), dtype=np.float64)

    def correlation(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    # The second half of a window is the first half of the next one; another walk is not.
    first, second, other = grey("ID_1_rec000_001.png"), grey("ID_1_rec000_002.png"), grey("ID_1_rec001_002.png")
    half = first.shape[1] // 2
    assert correlation(first[:, half:], second[:, :half]) > 0.75  # 0.85: each window is scaled to its own peak
    assert correlation(first[:, half:], other[:, :half]) < 0.6  # 0.47


def test_same_arguments_give_identical_files(tmp_path):
    assert simulate(tmp_path / "a", "--workers", 1).returncode == 0
    assert simulate(tmp_path / "b", "--workers", 2).returncode == 0
    for name in ("ID_1/ID_1_0000.png", "ID_2/ID_2_0001.png", "dataset_card.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert simulate(tmp_path / "c", "--seed", 4).returncode == 0
    assert (tmp_path / "a/ID_1/ID_1_0000.png").read_bytes() != (tmp_path / "c/ID_1/ID_1_0000.png").read_bytes()


def test_a_user_is_the_same_person_in_a_larger_dataset(tmp_path):
    assert simulate(tmp_path / "small", users=2, images=1).returncode == 0
    assert simulate(tmp_path / "large", users=3, images=1).returncode == 0
    name = "ID_2/ID_2_0000.png"
    assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "large" / name).read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_users", "0"], "--num_users"),
        (["--images_per_user", "-1"], "--images_per_user"),
        (["--resolution", "8"], "--resolution"),
        (["--colormap", "no_such_map"], "colour map"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, args, message):
    result = run_cli("-m", "utils.gait_simulator", "--output_dir", tmp_path / "out", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "sub", "/proc/mdaug_sim"):
        result = simulate(target)
        assert result.returncode == 2, target
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "x"


def test_non_empty_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    refused = simulate(tmp_path / "out")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    replaced = simulate(tmp_path / "out", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["ID_1", "ID_2", "dataset_card.json"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls, write_image = [], sim._write_image

    def fail_on_third(job):
        calls.append(job)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return write_image(job)

    monkeypatch.setattr(sim, "_write_image", fail_on_third)
    settings = sim.SimulationSettings(num_users=2, images_per_user=2, resolution=16)
    with pytest.raises(RuntimeError):
        sim.write_dataset(tmp_path / "out", settings, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []
