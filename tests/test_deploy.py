from conftest import tree_digest

def test_explore(workspace):
    ws = workspace
    d0 = tree_digest(ws.root)
    p = ws.cli("deploy", "--cycle", "1", "--all-adapters", "--endpoints", "mac-dev", "rtx-1", "--dry-run")
    print("DRY", p.returncode, p.stdout, p.stderr)
    assert tree_digest(ws.root) == d0
    p = ws.cli("deploy", "--cycle", "1", "--all-adapters", "--endpoints", "mac-dev", "rtx-1")
    print("REAL", p.returncode, p.stdout, p.stderr)
    p = ws.cli("deploy", "--cycle", "1", "--all-adapters", "--endpoints", "mac-dev", "rtx-1")
    print("AGAIN", p.returncode, p.stdout, p.stderr)
    import subprocess
    print(subprocess.run(["find", str(ws.root), "-printf", "%p %l\n"], capture_output=True, text=True).stdout)
    print(ws.log())
    print(ws.status_json("mac-dev"))
    assert 0
