# UNTESTED: this Windows installer mirrors install.sh but has never been run on Windows. Review it before use.
#
# Install edgegen from an offline archive on a Windows machine with no network.
#   powershell -ExecutionPolicy Bypass -File install.ps1 -Archive edgegen-offline-...-win-amd64-py3.11-cpu.tar [-Prefix DIR]
#   powershell -ExecutionPolicy Bypass -File install.ps1 -Uninstall [-Prefix DIR]
# Build a Windows archive on a connected machine with:
#   python -m installer.build_bundle --out dist --pip-platform win_amd64 --python-version 3.11
# Layout: PREFIX\venv, PREFIX\share\{assets,models,engines}, PREFIX\bin\edgegen.cmd, a Start-menu shortcut.
param(
    [Parameter(Position = 0)][string]$Archive,
    [Parameter(Position = 1)][string]$Prefix = (Join-Path $env:LOCALAPPDATA "Programs\edgegen"),
    [switch]$Uninstall,
    [string]$Python = $env:PYTHON,
    [switch]$SkipDoctor
)
$ErrorActionPreference = "Stop"
$Marker = "INSTALLED_BY_EDGEGEN"
$LauncherTag = "edgegen offline launcher"
$Shortcut = Join-Path ([Environment]::GetFolderPath("Programs")) "edgegen.lnk"

function Die([string]$Message) { [Console]::Error.WriteLine("install.ps1: error: $Message"); exit 1 }
function Say([string]$Message) { [Console]::Error.WriteLine("install.ps1: $Message") }

function Get-Info([string]$Dir, [string]$Key) {
    $line = Get-Content (Join-Path $Dir "BUNDLE_INFO") | Where-Object { $_.StartsWith("$Key=") } | Select-Object -First 1
    if ($null -eq $line) { return "" }
    return $line.Substring($Key.Length + 1)
}

function Remove-Edgegen([string]$Prefix) {
    $share = Join-Path $Prefix "share"
    if (-not (Test-Path (Join-Path $share $Marker))) { Die "no edgegen installed by install.ps1 in $Prefix" }
    $launcher = Join-Path $Prefix "bin\edgegen.cmd"
    if ((Test-Path $launcher) -and (Select-String -Path $launcher -SimpleMatch $LauncherTag -Quiet)) {
        Remove-Item $launcher -Force
    }
    if (Test-Path $Shortcut) { Remove-Item $Shortcut -Force }
    foreach ($d in @("venv", "share")) {
        $p = Join-Path $Prefix $d
        if (Test-Path $p) { Remove-Item $p -Recurse -Force }
    }
    Say "removed edgegen from $Prefix (your images, history, settings and audit log are kept)"
}

function Test-Archive([string]$Dir) {
    $sums = Join-Path $Dir "SHA256SUMS"
    if (-not (Test-Path $sums) -or -not (Test-Path (Join-Path $Dir "BUNDLE_INFO"))) {
        Die "this is not an edgegen offline archive (no SHA256SUMS/BUNDLE_INFO)"
    }
    $listed = @{}
    foreach ($line in Get-Content $sums) {
        $hash, $rel = $line -split "  ", 2
        $path = Join-Path $Dir ($rel -replace "/", "\")
        if (-not (Test-Path -LiteralPath $path -PathType Leaf)) { Die "$rel is missing; get a fresh copy" }
        $actual = (Get-FileHash -LiteralPath $path -Algorithm SHA256).Hash.ToLowerInvariant()
        if ($actual -ne $hash) { Die "$rel does not match its checksum: the archive is damaged or was changed" }
        $listed[$rel] = $true
    }
    $root = (Resolve-Path $Dir).Path.TrimEnd("\") + "\"
    foreach ($f in Get-ChildItem -LiteralPath $Dir -Recurse -File -Force) {
        $rel = $f.FullName.Substring($root.Length) -replace "\\", "/"
        if ($rel -ne "SHA256SUMS" -and -not $listed.ContainsKey($rel)) { Die "$rel is not listed in SHA256SUMS" }
    }
    Say "checksums verified ($($listed.Count) files)"
}

function Find-Python([string]$Want) {
    $candidates = @()
    if ($Python) { $candidates += , @($Python) } else { $candidates += , @("py", "-$Want"); $candidates += , @("python") }
    foreach ($c in $candidates) {
        $exe = $c[0]; $rest = @($c | Select-Object -Skip 1)
        if (-not (Get-Command $exe -ErrorAction SilentlyContinue)) { continue }
        $have = & $exe @rest -c "import sys; print('%d.%d' % sys.version_info[:2])" 2>$null
        if ($have -eq $Want) { return , $c }
    }
    Die "Python $Want was not found; install it from python.org (offline installer) or pass -Python C:\path\python.exe"
}

function Invoke-PipOffline([string]$VenvPython, [string]$Wheelhouse, [string[]]$PipArgs) {
    Get-ChildItem env: | Where-Object { $_.Name -like "PIP_*" } | ForEach-Object { Remove-Item "env:$($_.Name)" }
    $env:PIP_CONFIG_FILE = "nul"  # os.devnull on Windows: pip then reads no config file
    $env:PIP_NO_INPUT = "1"; $env:PIP_DISABLE_PIP_VERSION_CHECK = "1"
    & $VenvPython -m pip install --no-index --no-cache-dir --find-links $Wheelhouse @PipArgs
    if ($LASTEXITCODE -ne 0) { Die "pip could not install from the wheelhouse (see above)" }
}

function Install-Edgegen([string]$Archive, [string]$Prefix) {
    if (-not (Test-Path $Archive -PathType Leaf)) { Die "archive $Archive does not exist" }
    New-Item -ItemType Directory -Force -Path $Prefix | Out-Null
    $Prefix = (Resolve-Path $Prefix).Path
    $tmp = Join-Path ([IO.Path]::GetTempPath()) ("edgegen-install-" + [Guid]::NewGuid())
    New-Item -ItemType Directory -Path $tmp | Out-Null
    try {
        Say "unpacking $(Split-Path $Archive -Leaf)"
        tar.exe -xf $Archive -C $tmp
        if ($LASTEXITCODE -ne 0) { Die "cannot unpack $Archive (tar.exe ships with Windows 10 1803 and later)" }
        $tops = @(Get-ChildItem -LiteralPath $tmp -Directory)
        if ($tops.Count -ne 1) { Die "unexpected archive layout; get a fresh copy" }
        $top = $tops[0].FullName
        Test-Archive $top
        $version = Get-Info $top "VERSION"; $extras = Get-Info $top "EXTRAS"; $mode = Get-Info $top "MODE"
        $extraReqs = @((Get-Info $top "EXTRA_REQUIREMENTS") -split " " | Where-Object { $_ })
        $py = Find-Python (Get-Info $top "PYTHON")
        $venv = Join-Path $Prefix "venv"
        if (Test-Path $venv) { Remove-Item $venv -Recurse -Force }
        Say "creating the environment in $venv"
        & $py[0] @($py | Select-Object -Skip 1) -m venv $venv
        if ($LASTEXITCODE -ne 0) { Die "could not create a virtual environment" }
        $vpy = Join-Path $venv "Scripts\python.exe"
        $wh = Join-Path $top "wheelhouse"
        if ($mode -eq "full") {
            $spec = if ($extras) { "edgegen[$extras]==$version" } else { "edgegen==$version" }
            Invoke-PipOffline $vpy $wh (@($spec) + $extraReqs)
        } else {
            Invoke-PipOffline $vpy $wh @("-r", (Join-Path $top "requirements.txt"))
            Invoke-PipOffline $vpy $wh @("--no-deps", "edgegen==$version")
        }
        $share = Join-Path $Prefix "share"
        New-Item -ItemType Directory -Force -Path $share | Out-Null
        foreach ($kind in @("assets", "models", "engines")) {
            $src = Join-Path $top $kind
            if (Test-Path $src) { Copy-Item $src -Destination $share -Recurse -Force }
        }
        New-Item -ItemType Directory -Force -Path (Join-Path $share "engines"), (Join-Path $Prefix "bin") | Out-Null
        $launcher = Join-Path $Prefix "bin\edgegen.cmd"
        @(
            "@echo off",
            "rem $LauncherTag (written by install.ps1)",
            "set `"EDGEGEN_ASSETS=$share\assets`"",
            "if defined EDGEGEN_ENGINES (set `"EDGEGEN_ENGINES=%EDGEGEN_ENGINES%;$share\engines`") else (set `"EDGEGEN_ENGINES=$share\engines`")",
            "`"$venv\Scripts\edgegen.exe`" %*"
        ) | Set-Content -Path $launcher -Encoding ASCII
        $ws = New-Object -ComObject WScript.Shell
        $lnk = $ws.CreateShortcut($Shortcut)
        $lnk.TargetPath = $launcher; $lnk.Arguments = "app"; $lnk.WindowStyle = 7
        $lnk.IconLocation = Join-Path $share "assets\icons\edgegen.ico"
        $lnk.Description = "edgegen: offline image generation"
        $lnk.Save()
        "version=$version" | Set-Content -Path (Join-Path $share $Marker) -Encoding ASCII
        Say "installed edgegen $version: $launcher"
        if (-not $SkipDoctor) {
            & $launcher doctor
            if ($LASTEXITCODE -ne 0) { Say "edgegen doctor reported problems (above); the installation itself is complete" }
        }
    } finally {
        Remove-Item $tmp -Recurse -Force -ErrorAction SilentlyContinue
    }
}

if ($Uninstall) { Remove-Edgegen $Prefix; exit 0 }
if (-not $Archive) { Die "usage: install.ps1 -Archive FILE.tar [-Prefix DIR]  |  install.ps1 -Uninstall [-Prefix DIR]" }
Install-Edgegen $Archive $Prefix
