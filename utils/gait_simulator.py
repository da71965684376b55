"""Built-in dataset: micro-Doppler spectrograms of simulated walking people.

Physics, implemented from the published models:

* Kinematics: the global human walking model of Boulic, Magnenat-Thalmann & Thalmann,
  "A global human walking model with real-time kinematic personification", The Visual
  Computer 6 (1990), as used by V. C. Chen, *The Micro-Doppler Effect in Radar* (2011),
  ch. 4. Inputs are the height H and the relative velocity rv = v / Ht with the leg
  length Ht = 0.491 H. A cycle has relative length 1.346 sqrt(rv) (in leg lengths), so
  it lasts Dc = 1.346 sqrt(rv) / rv seconds, and the support phase Ds = 0.752 Dc - 0.143.
  Translations and rotations of the pelvis and thorax are the model's periodic
  functions; hip, knee, ankle, thorax torsion and elbow angles are periodic pchip
  curves through the model's control points; the left limbs run half a cycle behind.
* Scattering: each of 16 body segments is an ellipsoid whose radar cross-section at
  aspect angles (theta, phi) is  sigma = pi a^2 b^2 c^2 /
  (a^2 sin^2 theta cos^2 phi + b^2 sin^2 theta sin^2 phi + c^2 cos^2 theta)^2, and the
  baseband return is sum_k sqrt(sigma_k) / R_k^2 exp(-j 4 pi R_k / lambda)
  (amplitude by the radar equation), plus receiver noise and clutter at zero Doppler.
* Spectrogram: STFT (scipy.signal), |.| in dB with a fixed dynamic range below the
  image's peak, zero Doppler on the horizontal centre line (approaching = upwards),
  time to the right, a matplotlib colour map, resized to the requested resolution.

Identity: every user's biometrics (height, preferred speed, limb proportions, joint
amplitudes, arm swing, girth, a slight left/right asymmetry) come from (seed, user
number) alone, so `ID_5` is the same person in a 10-user and a 31-user dataset. Each
image varies the speed around the preferred one, the starting phase, the aspect angle,
the distance, the noise floor, the clutter and the swing of each joint a little. `identity_strength` scales how far people
differ from the average person: 0 makes everyone the same, 1 (default) is subtle, 2 is
easy to tell apart.

Recordings: by default every image is its own walk (independent images). With
`--windows_per_recording W`, a user's images are cut from recordings of W consecutive
windows of one longer walk, each window overlapping the next by half (as real datasets
are cut), named `ID_k_rec003_007.png` (recording 3, window 7); the card lists each image's
recording. A random split of such data puts near-copies on both sides: split them by
recording (`--group_pattern '(.*)_\\d+\\.png$'`).

    python -m utils.gait_simulator --output_dir data/simulated --num_users 31 \
        --images_per_user 150 --resolution 256 --seed 0
"""

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.interpolate import PchipInterpolator
from scipy.signal import stft
from tqdm import tqdm

from utils.cli import UsageError, run
from utils.files import atomic_folder

logger = logging.getLogger(__name__)

SIMULATOR_VERSION = "1.0"
SPEED_OF_LIGHT = 299_792_458.0
CARD_NAME = "dataset_card.json"

# Segment lengths as fractions of the height H (Chen 2011, after Boulic 1990).
SEGMENT_FRACTIONS = {
    "head": 0.130,
    "half_shoulder": 0.1295,
    "torso": 0.288,
    "half_hip": 0.0955,
    "upper_leg": 0.245,
    "lower_leg": 0.246,
    "foot": 0.143,
    "upper_arm": 0.188,
    "lower_arm": 0.152,
}
# Ellipsoid radius (a = b) of each segment, in metres for a 1.75 m person of average girth.
SEGMENT_RADII = {
    "head": 0.10,
    "torso": 0.15,
    "shoulder": 0.06,
    "hip": 0.07,
    "upper_arm": 0.05,
    "lower_arm": 0.04,
    "upper_leg": 0.08,
    "lower_leg": 0.055,
    "foot": 0.04,
}


@dataclass(frozen=True)
class RadarConfig:
    """Continuous-wave radar and spectrogram settings shared by every image."""

    carrier_hz: float = 5.8e9  # C-band, as in common gait micro-Doppler datasets
    prf_hz: float = 560.0  # Doppler span +-280 Hz = +-7.2 m/s: feet (<= ~6.8 m/s here) never alias
    duration_s: float = 3.0  # about 2.5 gait cycles
    radar_height_m: float = 1.0
    window_s: float = 0.16  # STFT Hann window
    hop_s: float = 0.0075
    nfft: int = 256
    dynamic_range_db: float = 40.0  # displayed range below each image's peak
    colormap: str = "jet"

    @property
    def wavelength_m(self):
        return SPEED_OF_LIGHT / self.carrier_hz


@dataclass(frozen=True)
class Person:
    """Fixed biometrics of one simulated user."""

    height_m: float
    preferred_speed_mps: float
    segment_scale: dict  # segment name -> multiplier of its length fraction
    joint_scale: dict  # joint name -> multiplier of its angle's swing about the mean
    arm_swing: float  # multiplier of the shoulder swing amplitude
    girth: float  # multiplier of every segment's radius
    left_leg_scale: float  # left/right asymmetry of the leg swing
    left_arm_scale: float  # ... of the arm swing
    left_phase_offset: float  # the left side lags 0.5 cycle plus this (cycles)

    @property
    def leg_length_m(self):
        """Ht = (upper leg + lower leg) H = 0.491 H for the average person."""
        s = self.segment_scale
        return self.height_m * (SEGMENT_FRACTIONS["upper_leg"] * s["upper_leg"] + SEGMENT_FRACTIONS["lower_leg"] * s["lower_leg"])

    def length(self, segment):
        return self.height_m * SEGMENT_FRACTIONS[segment] * self.segment_scale[segment]

    def on_the_day(self, walk):
        """The same person with one recording's stride-to-stride variation applied."""
        joint_scale = {joint: scale * walk.swing_jitter.get(joint, 1.0) for joint, scale in self.joint_scale.items()}
        return replace(self, joint_scale=joint_scale, arm_swing=self.arm_swing * walk.swing_jitter["arm"])


@dataclass(frozen=True)
class Walk:
    """What varies from one recording of a person to the next."""

    speed_mps: float
    start_phase: float  # gait cycle phase at t = 0, in cycles
    aspect_deg: float  # walking direction: 0 = straight at the radar, 180 = straight away
    distance_m: float  # initial ground distance from the radar
    snr_db: float  # signal-to-noise ratio per sample
    clutter_db: float  # static clutter power relative to the body's echo
    swing_jitter: dict  # joint -> multiplier of the person's swing in this recording


def user_person(seed, user_number, identity_strength=1.0):
    """The biometrics of user `user_number`, a function of (seed, user number) only."""
    rng = np.random.default_rng([seed, user_number, 0])
    s = identity_strength

    def vary(spread, size=None):
        return 1.0 + s * spread * rng.standard_normal(size)

    height = float(np.clip(1.72 + s * 0.08 * rng.standard_normal(), 1.50, 1.95))
    speed = float(np.clip(1.30 + s * 0.12 * rng.standard_normal(), 0.95, 1.70))
    segment_scale = dict(zip(SEGMENT_FRACTIONS, vary(0.03, len(SEGMENT_FRACTIONS)).round(4).tolist()))
    joints = ("hip", "knee", "ankle", "elbow", "pelvis", "thorax")
    joint_scale = dict(zip(joints, vary(0.08, len(joints)).round(4).tolist()))
    return Person(
        height_m=round(height, 4),
        preferred_speed_mps=round(speed, 4),
        segment_scale=segment_scale,
        joint_scale=joint_scale,
        arm_swing=round(float(np.clip(vary(0.20), 0.4, 1.8)), 4),
        girth=round(float(np.clip(vary(0.10), 0.7, 1.4)), 4),
        left_leg_scale=round(float(vary(0.05)), 4),
        left_arm_scale=round(float(vary(0.10)), 4),
        left_phase_offset=round(float(s * 0.01 * rng.standard_normal()), 4),
    )


def sample_walk(person, rng, max_aspect_deg=30.0):
    return Walk(
        speed_mps=float(person.preferred_speed_mps * (1.0 + 0.08 * rng.standard_normal())),
        start_phase=float(rng.uniform(0.0, 1.0)),
        aspect_deg=float(rng.uniform(-max_aspect_deg, max_aspect_deg)),
        distance_m=float(rng.uniform(6.0, 10.0)),
        snr_db=float(rng.uniform(10.0, 20.0)),
        clutter_db=float(rng.uniform(-15.0, -3.0)),
        swing_jitter={
            joint: round(float(1.0 + spread * rng.standard_normal()), 4)
            for joint, spread in (("hip", 0.04), ("knee", 0.04), ("ankle", 0.04), ("elbow", 0.06), ("arm", 0.08))
        },
    )


# --- Boulic kinematics -------------------------------------------------------------------


def gait_timing(relative_velocity):
    """(cycle duration Dc in s, support duration Ds in s) of Boulic's model."""
    cycle = 1.346 * np.sqrt(relative_velocity) / relative_velocity
    return cycle, 0.752 * cycle - 0.143


def periodic_pchip(points, phase):
    """Evaluate the periodic pchip curve through (phase, value) control points in [0, 1)."""
    x, y = np.asarray(points, dtype=float).T
    # Sorted, and a point that coincides with an earlier one (mod 1) is the same point.
    x, first = np.unique(np.round(np.mod(x, 1.0), 9), return_index=True)
    y = y[first]
    curve = PchipInterpolator(np.concatenate([x - 1, x, x + 1]), np.tile(y, 3))
    return curve(np.mod(phase, 1.0))


def joint_curves(rv, support_fraction):
    """Control points (phase, degrees) of the model's joint angles for relative velocity rv.

    Boulic's curves are given for three regimes of rv; between them the control points
    move linearly with rv, as in the paper's appendices.
    """
    if rv < 1.3:  # regime (b), 0.5 <= rv < 1.3
        u = (rv - 0.5) / 0.8
        hip = [(-0.1, 25.0), (0.5, -15.0), (0.9, 25.0)]
        knee = [(0.17, 3.0), (0.4, 3.0), (0.75, 70.0), (1.0, 3.0)]
        ankle = [(0.0, -3.0), (0.08, -18.0), (0.5, 8.0), (support_fraction, -20.0), (0.85, -3.0)]
        elbow = [(0.05, 6.0 + 8.0 * u), (0.5 + 0.01 * u, 20.0 + 24.0 * u), (0.9, 8.0 + 9.0 * u)]
    else:  # regime (c), 1.3 <= rv <= 3
        u = (rv - 1.3) / 1.7
        hip = [(-0.1 + 0.2 * u, 25.0 + 5.0 * u), (0.5, -15.0), (0.9, 25.0 + 6.0 * u)]
        knee = [(0.17 - 0.05 * u, 3.0 + 22.0 * u), (0.4, 3.0), (0.75 - 0.05 * u, 70.0 - 5.0 * u), (1.0 - 0.03 * u, 3.0 + 3.0 * u)]
        ankle = [
            (0.0, -3.0 + 5.0 * u),
            (0.08, -18.0 + 4.0 * u),
            (0.5 - 0.1 * u, 8.0 - 3.0 * u),
            (support_fraction, -20.0 - 8.0 * u),
            (0.85, -3.0 + 5.0 * u),
        ]
        elbow = [(0.05, 14.0 - 6.0 * u), (0.51 + 0.04 * u, 44.0 + 26.0 * u), (0.9 - 0.1 * u, 17.0 - 6.0 * u)]
    thorax = [(0.1, 4.0 / 3.0 * rv), (0.4, -4.5 / 3.0 * rv), (0.6, -4.0 / 3.0 * rv), (0.9, 4.5 / 3.0 * rv)]
    return {"hip": hip, "knee": knee, "ankle": ankle, "elbow": elbow, "thorax": thorax}


def scaled_swing(values, scale):
    """Scale a joint angle's swing about its mean, keeping the mean posture."""
    mean = values.mean()
    return mean + scale * (values - mean)


def pelvis_list_deg(phase, amplitude):
    """Left/right rotation of the pelvis (Boulic appendix B): the pelvis drops on the
    side of the swinging leg; four cosine arcs over the cycle."""
    p = np.mod(phase, 1.0)
    return np.select(
        [p < 0.15, p < 0.5, p < 0.65],
        [
            -amplitude + amplitude * np.cos(2 * np.pi * 10 * p / 3),
            -amplitude - amplitude * np.cos(2 * np.pi * 10 * (p - 0.15) / 7),
            amplitude - amplitude * np.cos(2 * np.pi * 10 * (p - 0.5) / 3),
        ],
        amplitude + amplitude * np.cos(2 * np.pi * 10 * (p - 0.65) / 7),
    )


def _sagittal(angle_deg, length, pointing="down"):
    """Vector of a segment rotated by angle (deg) in the sagittal plane, (T, 3).

    A positive angle swings a downward segment forward (+x) and lifts a forward one (+z).
    """
    a = np.radians(angle_deg)
    zeros = np.zeros_like(a)
    if pointing == "down":
        return length * np.stack([np.sin(a), zeros, -np.cos(a)], axis=-1)
    return length * np.stack([np.cos(a), zeros, np.sin(a)], axis=-1)


def _rotate(points, angle_deg, axis):
    """Rotate (T, 3) points about the x, y or z axis through the origin, per time step."""
    a = np.radians(angle_deg)[:, None]
    c, s = np.cos(a), np.sin(a)
    x, y, z = points[:, 0:1], points[:, 1:2], points[:, 2:3]
    if axis == "x":
        return np.concatenate([x, c * y - s * z, s * y + c * z], axis=1)
    if axis == "y":
        return np.concatenate([c * x + s * z, y, -s * x + c * z], axis=1)
    return np.concatenate([c * x - s * y, s * x + c * y, z], axis=1)


def body_joints(person, speed_mps, t, start_phase=0.0):
    """Joint positions (T, 3) in metres over times t (s), in the walker's frame:
    x forward, y left, z up, ground at z = 0, moving forward at speed_mps."""
    Ht = person.leg_length_m
    rv = speed_mps / Ht
    if not 0.5 <= rv <= 3.0:
        raise ValueError(f"relative velocity {rv:.2f} outside Boulic's model range [0.5, 3]")
    cycle_s, support_s = gait_timing(rv)
    support_fraction = support_s / cycle_s
    curves = joint_curves(rv, support_fraction)
    js = person.joint_scale
    phase_right = start_phase + t / cycle_s
    phase_left = phase_right + 0.5 + person.left_phase_offset

    # Pelvis (origin of the spine) translations in leg lengths, rotations in degrees.
    vertical = Ht * (-0.015 * rv + 0.015 * rv * np.sin(2 * np.pi * (2 * phase_right - 0.35)))
    lateral = Ht * -0.032 * np.sin(2 * np.pi * (phase_right - 0.1))
    surge = Ht * -0.021 * np.sin(2 * np.pi * (2 * phase_right + 2 * (0.625 - support_fraction)))
    lean = 2.0 - 2.0 * np.sin(2 * np.pi * (2 * phase_right - 0.1))  # forward lean of the trunk, 0..4 deg
    pelvis_list = js["pelvis"] * pelvis_list_deg(phase_right, 1.66 * rv)
    pelvis_torsion = js["pelvis"] * -4.0 * rv * np.cos(2 * np.pi * phase_right)
    thorax_torsion = js["thorax"] * periodic_pchip(curves["thorax"], phase_right)

    joints = {"base": np.zeros((len(t), 3))}
    for side, phase, sign, leg_scale, arm_scale in (
        ("right", phase_right, -1.0, 1.0, 1.0),
        ("left", phase_left, 1.0, person.left_leg_scale, person.left_arm_scale),
    ):
        hip = leg_scale * js["hip"] * periodic_pchip(curves["hip"], phase)
        knee = leg_scale * scaled_swing(periodic_pchip(curves["knee"], phase), js["knee"])
        ankle = leg_scale * scaled_swing(periodic_pchip(curves["ankle"], phase), js["ankle"])
        hip_joint = np.tile([0.0, sign * person.length("half_hip"), 0.0], (len(t), 1))
        knee_joint = hip_joint + _sagittal(hip, person.length("upper_leg"))
        ankle_joint = knee_joint + _sagittal(hip - knee, person.length("lower_leg"))
        toe = ankle_joint + _sagittal(hip - knee + ankle, person.length("foot"), pointing="forward")
        for name, point in (("hip", hip_joint), ("knee", knee_joint), ("ankle", ankle_joint), ("toe", toe)):
            # The legs hang from the pelvis, which lists and twists.
            joints[f"{side}_{name}"] = _rotate(_rotate(point, pelvis_list, "x"), pelvis_torsion, "z")

        # Arms swing against the leg of their side (Boulic appendix D).
        swing = 9.88 * rv * person.arm_swing * arm_scale
        shoulder_flex = 3.0 - swing / 2 - swing * np.cos(2 * np.pi * phase)
        elbow_flex = scaled_swing(periodic_pchip(curves["elbow"], phase), js["elbow"])
        shoulder = np.tile([0.0, sign * person.length("half_shoulder"), person.length("torso")], (len(t), 1))
        elbow = shoulder + _sagittal(shoulder_flex, person.length("upper_arm"))
        hand = elbow + _sagittal(shoulder_flex + elbow_flex, person.length("lower_arm"))
        for name, point in (("shoulder", shoulder), ("elbow", elbow), ("hand", hand)):
            joints[f"{side}_{name}"] = point
    joints["neck"] = np.tile([0.0, 0.0, person.length("torso")], (len(t), 1))
    joints["head"] = np.tile([0.0, 0.0, person.length("torso") + person.length("head")], (len(t), 1))
    for name in ("neck", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_hand", "right_hand"):
        # The thorax leans forward and twists against the pelvis; the arms go with it.
        joints[name] = _rotate(_rotate(joints[name], lean, "y"), thorax_torsion, "z")

    offset = np.stack([surge + speed_mps * t, lateral, Ht + vertical], axis=-1)
    return {name: point + offset for name, point in joints.items()}


# Ellipsoid segments between joints: (name, from joint, to joint, radius key).
SEGMENTS = [("head", "neck", "head", "head"), ("torso", "base", "neck", "torso")] + [
    (f"{side}_{name}", f"{side}_{a}" if a != "neck" and a != "base" else a, f"{side}_{b}", radius)
    for side in ("left", "right")
    for name, a, b, radius in (
        ("shoulder", "neck", "shoulder", "shoulder"),
        ("upper_arm", "shoulder", "elbow", "upper_arm"),
        ("lower_arm", "elbow", "hand", "lower_arm"),
        ("hip", "base", "hip", "hip"),
        ("upper_leg", "hip", "knee", "upper_leg"),
        ("lower_leg", "knee", "ankle", "lower_leg"),
        ("foot", "ankle", "toe", "foot"),
    )
]


def ellipsoid_rcs(a, b, c, theta, phi):
    """Radar cross-section (m^2) of an ellipsoid with semi-axes a, b, c (c along its
    symmetry axis) seen at aspect angles theta (from the c axis) and phi."""
    denominator = (
        a**2 * np.sin(theta) ** 2 * np.cos(phi) ** 2 + b**2 * np.sin(theta) ** 2 * np.sin(phi) ** 2 + c**2 * np.cos(theta) ** 2
    )
    return np.pi * a**2 * b**2 * c**2 / denominator**2


def walker_world_positions(joints, walk):
    """Map walker-frame joints to radar coordinates (radar above the origin, the walker
    starting `distance_m` away on the +x axis, heading `aspect_deg` off the radar)."""
    heading = np.radians(walk.aspect_deg)
    forward = np.array([-np.cos(heading), np.sin(heading), 0.0])
    left = np.array([-forward[1], forward[0], 0.0])
    start = np.array([walk.distance_m, 0.0, 0.0])
    return {
        name: start + p[:, :1] * forward + p[:, 1:2] * left + p[:, 2:3] * np.array([0.0, 0.0, 1.0])
        for name, p in joints.items()
    }


def segment_returns(person, walk, radar, t):
    """Per-segment complex baseband returns (S, T) and ranges (S, T)."""
    joints = walker_world_positions(body_joints(person.on_the_day(walk), walk.speed_mps, t, walk.start_phase), walk)
    radar_position = np.array([0.0, 0.0, radar.radar_height_m])
    size = person.height_m / 1.75 * person.girth
    returns, ranges = [], []
    for _, start, end, radius in SEGMENTS:
        a, b = joints[start], joints[end]
        centre = (a + b) / 2
        axis = b - a
        half_length = np.linalg.norm(axis, axis=1) / 2
        line_of_sight = centre - radar_position
        distance = np.linalg.norm(line_of_sight, axis=1)
        cos_theta = np.abs(np.sum(axis * line_of_sight, axis=1)) / (2 * half_length * distance)
        theta = np.arccos(np.clip(cos_theta, 0.0, 1.0))
        r = SEGMENT_RADII[radius] * size
        # a = b: the cross-section does not depend on phi.
        sigma = ellipsoid_rcs(r, r, half_length, theta, 0.0)
        returns.append(np.sqrt(sigma) / distance**2 * np.exp(-4j * np.pi * distance / radar.wavelength_m))
        ranges.append(distance)
    return np.array(returns), np.array(ranges)


def radar_signal(person, walk, radar, rng):
    """Received baseband signal: body echo + static clutter + receiver noise, (T,)."""
    t = np.arange(int(round(radar.duration_s * radar.prf_hz))) / radar.prf_hz
    body = segment_returns(person, walk, radar, t)[0].sum(axis=0)
    power = np.mean(np.abs(body) ** 2)
    # Clutter: a static echo plus a slowly drifting part (a few Hz wide) at zero Doppler.
    drift = np.cumsum(rng.standard_normal(len(t)) + 1j * rng.standard_normal(len(t)))
    drift = (drift - drift.mean()) / (np.std(drift) + 1e-12)
    clutter = np.sqrt(power * 10 ** (walk.clutter_db / 10)) * (np.exp(2j * np.pi * rng.uniform()) + 0.1 * drift)
    noise_std = np.sqrt(power / 10 ** (walk.snr_db / 10) / 2)
    noise = noise_std * (rng.standard_normal(len(t)) + 1j * rng.standard_normal(len(t)))
    return body + clutter + noise


def spectrogram_db(signal, radar):
    """|STFT| in dB, rows = Doppler from +prf/2 (top) to -prf/2, columns = time."""
    window = int(round(radar.window_s * radar.prf_hz))
    hop = max(1, int(round(radar.hop_s * radar.prf_hz)))
    _, _, frames = stft(
        signal,
        fs=radar.prf_hz,
        window="hann",
        nperseg=window,
        noverlap=window - hop,
        nfft=radar.nfft,
        return_onesided=False,
        boundary=None,
        padded=False,
    )
    magnitude = np.abs(np.fft.fftshift(frames, axes=0))[::-1]  # approaching (positive Doppler) at the top
    return 20 * np.log10(magnitude + 1e-30)


def colour_lut(name):
    import matplotlib  # only the colour map registry; no plotting backend

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise UsageError(f"unknown colour map {name!r}; use a matplotlib name such as jet, viridis, turbo") from None
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def render_image(power_db, radar, resolution, lut):
    """Colour image of a spectrogram: a fixed dynamic range below its peak, resized."""
    normalised = np.clip((power_db - power_db.max()) / radar.dynamic_range_db + 1.0, 0.0, 1.0)
    rgb = lut[np.round(normalised * 255).astype(np.uint8)]
    return Image.fromarray(rgb).resize((resolution, resolution), Image.Resampling.BICUBIC)


@dataclass
class SimulationSettings:
    """Everything that determines the dataset, as written to its card."""

    num_users: int = 31
    images_per_user: int = 150
    resolution: int = 256
    seed: int = 0
    identity_strength: float = 1.0
    max_aspect_deg: float = 30.0
    radar: RadarConfig = field(default_factory=RadarConfig)
    windows_per_recording: int = 1  # 1: every image is its own walk

    def recordings(self):
        """(recording index, number of windows) of one user; the last recording may be shorter."""
        w = self.windows_per_recording
        return [(r, min(w, self.images_per_user - r * w)) for r in range(-(-self.images_per_user // w))]


def simulate_image(settings, user_number, image_index, lut=None):
    """One spectrogram image of one user, and the walk it shows."""
    person = user_person(settings.seed, user_number, settings.identity_strength)
    rng = np.random.default_rng([settings.seed, user_number, 1, image_index])
    walk = sample_walk(person, rng, settings.max_aspect_deg)
    signal = radar_signal(person, walk, settings.radar, rng)
    lut = colour_lut(settings.radar.colormap) if lut is None else lut
    return render_image(spectrogram_db(signal, settings.radar), settings.radar, settings.resolution, lut), walk


def simulate_recording(settings, user_number, recording, windows, lut=None):
    """`windows` images cut from one walk, each overlapping the next by half a window, and the walk.

    The walk starts as much further away as it lasts longer than one window, so it ends
    where an independent image's walk would, in front of the radar."""
    person = user_person(settings.seed, user_number, settings.identity_strength)
    rng = np.random.default_rng([settings.seed, user_number, 2, recording])
    walk = sample_walk(person, rng, settings.max_aspect_deg)
    radar = settings.radar
    # Columns of one window as in an independent image; window k starts k half-windows later.
    width = spectrogram_db(np.zeros(int(round(radar.duration_s * radar.prf_hz))), radar).shape[1]
    step = width // 2
    extra_s = (windows - 1) * step * max(1, int(round(radar.hop_s * radar.prf_hz))) / radar.prf_hz
    walk = replace(walk, distance_m=walk.distance_m + walk.speed_mps * extra_s)
    power_db = spectrogram_db(radar_signal(person, walk, replace(radar, duration_s=radar.duration_s + extra_s), rng), radar)
    lut = colour_lut(radar.colormap) if lut is None else lut
    images = [render_image(power_db[:, k * step:k * step + width], radar, settings.resolution, lut) for k in range(windows)]
    return images, walk


def user_folder(user_number):
    return f"ID_{user_number}"


def image_name(user_number, image_index, recording=None):
    """`ID_5_0007.png`, or `ID_5_rec002_003.png` for window 3 of recording 2."""
    if recording is None:
        return f"ID_{user_number}_{image_index:04d}.png"
    return f"ID_{user_number}_rec{recording:03d}_{image_index:03d}.png"


_worker_lut = None


def _write_image(job):
    """Worker: simulate and save one image (or one recording's windows); returns
    {file name: walk parameters} of what it wrote."""
    global _worker_lut
    settings, folder, user_number, index, windows = job
    if _worker_lut is None:
        _worker_lut = colour_lut(settings.radar.colormap)
    if windows is None:
        image, walk = simulate_image(settings, user_number, index, _worker_lut)
        named = {image_name(user_number, index): image}
    else:
        images, walk = simulate_recording(settings, user_number, index, windows, _worker_lut)
        named = {image_name(user_number, k, recording=index): image for k, image in enumerate(images)}
    walk = asdict(walk)
    if windows is not None:
        walk["recording"] = f"rec{index:03d}"
    for name, image in named.items():
        # zlib level 1: a third of level 6's time for 17% larger files; still deterministic.
        image.save(Path(folder) / user_folder(user_number) / name, compress_level=1)
    return user_number, {name: walk for name in named}


def write_dataset(output_dir, settings, workers=1, overwrite=False, progress=True):
    """Write ID_1/ .. ID_N/ PNGs and dataset_card.json into output_dir, atomically:
    everything goes to a hidden sibling folder first, which is renamed at the end
    (an existing output_dir is replaced only when overwrite was allowed)."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    colour_lut(settings.radar.colormap)  # fail on a bad colour map before any work
    try:
        with atomic_folder(output_dir) as partial:
            for user in range(1, settings.num_users + 1):
                (partial / user_folder(user)).mkdir()
            users = range(1, settings.num_users + 1)
            independent = settings.windows_per_recording == 1
            if independent:
                jobs = [(settings, str(partial), user, index, None) for user in users for index in range(settings.images_per_user)]
            else:
                jobs = [(settings, str(partial), user, r, w) for user in users for r, w in settings.recordings()]
            started = time.perf_counter()
            bar = dict(total=len(jobs), desc="simulating", unit="img" if independent else "recording", disable=not progress)
            if workers > 1:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    results = list(tqdm(pool.map(_write_image, jobs, chunksize=16 if independent else 1), **bar))
            else:
                results = [_write_image(job) for job in tqdm(jobs, **bar)]
            seconds = time.perf_counter() - started
            walks = {user: {} for user in users}
            for user, named in results:
                walks[user].update(named)
            write_card(partial, settings, walks)
    except OSError as error:  # an unwritable place or a full disk: the user can fix either
        raise UsageError(f"cannot write {output_dir}: {error.strerror or error}") from None
    return settings.num_users * settings.images_per_user, seconds


def write_card(folder, settings, walks):
    """dataset_card.json; `walks` maps user number -> {file name: walk parameters}."""
    users = [
        {
            "folder": user_folder(user),
            "user_number": user,
            "person": asdict(user_person(settings.seed, user, settings.identity_strength)),
            "images": walks[user],
        }
        for user in range(1, settings.num_users + 1)
    ]
    radar = asdict(settings.radar)
    radar["wavelength_m"] = settings.radar.wavelength_m
    card = {
        "simulator": "utils.gait_simulator",
        "simulator_version": SIMULATOR_VERSION,
        "model": "Boulic et al. 1990 walking model, ellipsoid scatterers (Chen 2011, ch. 4)",
        "seed": settings.seed,
        "num_users": settings.num_users,
        "images_per_user": settings.images_per_user,
        "resolution": settings.resolution,
        "identity_strength": settings.identity_strength,
        "max_aspect_deg": settings.max_aspect_deg,
        "windows_per_recording": settings.windows_per_recording,
        "recordings": ("independent images: every image is its own walk" if settings.windows_per_recording == 1 else
                       f"each recording is one walk cut into up to {settings.windows_per_recording} windows, each "
                       "overlapping the next by half; images that share `recording` (the `recNNN` in the file name) "
                       "are near-copies of each other: keep a recording on one side of a split"),
        "radar": radar,
        "image_axes": "rows: Doppler from +prf/2 (top, approaching) to -prf/2; columns: time",
        "users": users,
    }
    (folder / CARD_NAME).write_text(json.dumps(card, indent=1))


def read_settings(folder):
    """The SimulationSettings a dataset folder was written with, from its card (write_card's inverse)."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        raise UsageError(f"{folder} has no {CARD_NAME}: not a dataset written by the simulator")
    card = json.loads(path.read_text())
    radar = {f.name: card["radar"][f.name] for f in fields(RadarConfig) if f.name in card["radar"]}
    values = {f.name: card[f.name] for f in fields(SimulationSettings) if f.name in card and f.name != "radar"}
    return SimulationSettings(**values, radar=RadarConfig(**radar))


def check_output_dir(output_dir, overwrite):
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file, not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {output_dir} is not empty; pass --overwrite to replace it")
    parent = output_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir} is not writable")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m utils.gait_simulator",
        description="Write the built-in dataset: simulated micro-Doppler spectrograms of walking people "
        "(Boulic walking model, ellipsoid scatterers), one folder ID_k/ per user, plus dataset_card.json.",
    )
    parser.add_argument("--output_dir", required=True, help="folder to create (ID_1/ .. ID_N/ and dataset_card.json)")
    parser.add_argument("--num_users", type=int, default=31, help="number of people (default 31)")
    parser.add_argument("--images_per_user", type=int, default=150, help="spectrograms per person (default 150)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels, >= 16 (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same arguments give byte-identical PNGs (default 0)")
    parser.add_argument(
        "--identity_strength",
        type=float,
        default=1.0,
        help="how much people differ from the average person: 0 = all alike, 1 = subtle (default), 2 = easy",
    )
    parser.add_argument("--windows_per_recording", type=int, default=1,
                        help="cut each user's images from recordings of this many consecutive windows of one walk, "
                             "each overlapping the next by half (file names carry the recording); default 1: "
                             "independent images")
    parser.add_argument("--max_aspect_deg", type=float, default=30.0, help="walking directions vary within +-this angle of the radar's line of sight (default 30)")
    parser.add_argument("--carrier_ghz", type=float, default=RadarConfig.carrier_hz / 1e9, help="radar carrier frequency in GHz (default 5.8)")
    parser.add_argument("--prf_hz", type=float, default=RadarConfig.prf_hz, help=f"pulse repetition frequency; the image spans +-prf/2 Doppler (default {RadarConfig.prf_hz:g})")
    parser.add_argument("--duration_s", type=float, default=RadarConfig.duration_s, help="observation window in seconds (default 3)")
    parser.add_argument("--dynamic_range_db", type=float, default=RadarConfig.dynamic_range_db, help=f"dB below each image's peak shown in colour (default {RadarConfig.dynamic_range_db:g})")
    parser.add_argument("--colormap", default=RadarConfig.colormap, help="matplotlib colour map (default jet)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default: the CPU count, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser.parse_args(argv)


def settings_from_args(args):
    # Counts, signs and ranges: utils.cli.NUMBER_RULES, checked before main.
    if args.resolution < 16:
        raise UsageError(f"--resolution must be at least 16, got {args.resolution}")
    if args.duration_s < 0.5 or args.prf_hz < 100 or args.carrier_ghz <= 0 or args.dynamic_range_db <= 0:
        raise UsageError("radar settings out of range: --duration_s >= 0.5, --prf_hz >= 100, --carrier_ghz > 0, --dynamic_range_db > 0")
    radar = RadarConfig(
        carrier_hz=args.carrier_ghz * 1e9,
        prf_hz=args.prf_hz,
        duration_s=args.duration_s,
        dynamic_range_db=args.dynamic_range_db,
        colormap=args.colormap,
    )
    return SimulationSettings(
        num_users=args.num_users,
        images_per_user=args.images_per_user,
        resolution=args.resolution,
        seed=args.seed,
        identity_strength=args.identity_strength,
        max_aspect_deg=args.max_aspect_deg,
        radar=radar,
        windows_per_recording=args.windows_per_recording,
    )


def main(args):
    settings = settings_from_args(args)
    count, seconds = write_dataset(args.output_dir, settings, workers=args.workers, overwrite=args.overwrite)
    print(
        f"wrote {count} images of {settings.num_users} users to {args.output_dir} "
        f"in {seconds:.1f} s ({count / seconds:.1f} images/s, {args.workers} workers)"
    )
    return 0


if __name__ == "__main__":
    run(main, parse_args())
